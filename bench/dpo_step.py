"""Diffusion-DPO step time and peak memory against the bare passes a DPO step needs.

A DPO step on B pairs needs: one policy forward + backward over the 2B noised latents (winners
and losers batched) and one reference forward over the same 2B (LoRA disabled, no grad). This
script times, in one run and on the same inputs (interleaved medians):

  bare      those two denoiser passes alone (a plain MSE on the output, nothing else)
  cached    DiffusionDPOTrainer.dpo_step + backward on a batch from the latent cache
            (data.cache): latents drawn from the stored VAE posteriors, stored prompt embeddings,
            noise, targets, both passes, the loss. Goal: cached / bare <= 1.10.
  uncached  the same step on pixels, as training without a cache does: the VAE encode of the 2B
            images and the prompt encoding every step (the bare passes exclude both).

and, with ``--memory``, the peak memory of a few training steps in a fresh process each (RSS on
the CPU, ``torch.cuda.max_memory_allocated`` on CUDA): without the cache, with it, and with it
plus ``train.offload_frozen`` (the VAE and text encoders on the CPU; on a CPU-only machine that
changes nothing).

    python bench/dpo_step.py                                     # tiny SDXL on the CPU
    python bench/dpo_step.py --size small --memory               # compute-bound on a CPU (see bench/sizes.py)
    python bench/dpo_step.py --size full --device cuda --dtype bf16 --batch 2 --memory   # SDXL base, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from sizes import add_size_arguments, build_policy, denoiser_forward_ms
from timing import timed_interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MEMORY_MODES = ("no cache", "cache", "cache + offload_frozen")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(parser, family="sdxl")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per mode (fresh processes)")
    parser.add_argument("--memory-run", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    return parser.parse_args()


class RandomPairs:
    """B random image pairs with distinct prompts, in the shape diffalign.data's pair sets have."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        from PIL import Image

        from diffalign.data import PreferencePair

        g = torch.Generator().manual_seed(index)
        images = [Image.fromarray((torch.rand(self.size, self.size, 3, generator=g) * 255).byte().numpy()) for _ in "wl"]
        return PreferencePair(f"a photo of object {index}", images[0], images[1], f"pair {index}")


def setup(args):
    """(policy, LoRA params, trainer with its cache, pixel batch, cached batch, autocast)."""
    from diffalign import lora
    from diffalign.config import load_config
    from diffalign.data import collate_pairs
    from diffalign.latent_cache import PairCache, encode_pairs
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    policy = build_policy(args.family, args.size, args.device, dtype, args.resolution)
    cfg = load_config({"method": "diffusion_dpo", "model": f"tiny-{args.family}", "lora": {"rank": args.rank},
                       "data": {"source": "builtin:brightness"}, "dpo": {"beta": 5000.0}})
    params = lora.add_lora(policy.denoiser, policy.family, cfg.lora)
    with torch.no_grad():  # a non-zero LoRA, as mid-training
        for p in params:
            p.normal_(0, 0.01)
    autocast = lambda: torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    size = policy.default_resolution()
    pairs = RandomPairs(args.batch, size)
    trainer = DiffusionDPOTrainer(cfg)
    tensors, meta = encode_pairs(policy, pairs, size, False, autocast, show_progress=False)
    trainer.cache = PairCache(tensors.__getitem__, meta, "bench")
    indices = list(range(args.batch))
    return policy, params, trainer, collate_pairs(pairs, indices, size, 0, 0, False, False), \
        trainer.cache.batch(indices, 0, 0, False), autocast


def peak_memory(device: str) -> float:
    """Bytes: the process's peak RSS on the CPU, max_memory_allocated on CUDA."""
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory_run(args) -> None:
    """Three training steps in this fresh process in one mode; prints {"peak": bytes} as JSON."""
    policy, params, trainer, pixels, cached, autocast = setup(args)
    if args.memory_run == "cache + offload_frozen":
        policy.offload_frozen()
    batch = pixels if args.memory_run == "no cache" else cached
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(3):
        with autocast():
            loss, _ = trainer.dpo_step(policy, batch, torch.Generator().manual_seed(step))
        loss.backward()
        for p in params:
            p.grad = None
    print(json.dumps({"peak": peak_memory(args.device)}))


def main() -> int:
    args = parse_args()
    if args.memory_run:
        memory_run(args)
        return 0
    from diffalign.losses import per_sample_mse

    policy, params, trainer, pixels, cached, autocast = setup(args)
    size, b = policy.default_resolution(), args.batch
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # pre-encoded inputs for the bare passes
        latents = policy.encode_images(torch.cat([pixels.chosen, pixels.rejected]).to(policy.device), g)
        cond = policy.with_image_sizes(policy.encode_prompts(pixels.prompts * 2), size, size)
    t = policy.training_timesteps(b, g).repeat(2)
    noise = torch.randn(latents[:b].shape, generator=g).to(latents.device).repeat(2, 1, 1, 1)
    x_t, target = policy.noise(latents, noise, t), policy.target(latents, noise, t)

    def bare():
        with autocast():
            per_sample_mse(policy.predict(x_t, t, cond), target).mean().backward()
            with torch.no_grad(), policy.reference():
                policy.predict(x_t, t, cond)

    def step(batch):
        def run():
            with autocast():
                loss, _ = trainer.dpo_step(policy, batch, torch.Generator().manual_seed(1))
            loss.backward()
        return run

    def reset():
        for p in params:
            p.grad = None

    forward_ms = denoiser_forward_ms(policy, 2 * b)
    results = timed_interleaved({"bare": bare, "cached": step(cached), "uncached": step(pixels)},
                                args.device, args.repeats, reset)
    bare_t, bare_m = results["bare"]
    print(f"{args.size} {args.family} ({type(policy.denoiser).__name__}, "
          f"{sum(p.numel() for p in policy.denoiser.parameters()) / 1e6:.1f}M) on {args.device}, {args.dtype}, "
          f"{size}px, {b} pairs, LoRA rank {args.rank}, median of {args.repeats}; one denoiser forward over "
          f"{2 * b} latents: {forward_ms:.1f} ms")
    for name, (seconds, peak) in results.items():
        mem = "" if peak != peak else f"  peak {peak / 2**20:8.1f} MiB  ({peak / bare_m:.3f}x bare)"
        print(f"{name:>9}: {seconds * 1000:8.1f} ms  ({seconds / bare_t:.3f}x bare){mem}")
    ratio = results["cached"][0] / bare_t
    print(f"DPO step from the cache / bare passes: {ratio:.3f}x (goal <= 1.10x): {'met' if ratio <= 1.10 else 'NOT met'}")
    if args.memory:
        print("peak memory of 3 training steps, each in a fresh process "
              f"({'max_memory_allocated' if args.device.startswith('cuda') else 'RSS'}):")
        base = None
        for mode in MEMORY_MODES:
            command = [sys.executable, __file__, "--memory-run", mode] + [a for a in sys.argv[1:] if a != "--memory"]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peak = json.loads(out)["peak"]
            base = base or peak
            print(f"  {mode:>22}: {peak / 2**20:9.1f} MiB  ({peak / base:.3f}x no cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
