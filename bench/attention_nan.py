"""Which attention kernel gives non-finite LoRA gradients: Diffusion-DPO steps on an embedded tiny
model in reduced precision, once per set of scaled_dot_product_attention kernels.

For every kernel set the same run is repeated from the same seed: the tiny model with a fresh
LoRA, ``--steps`` DPO steps over the built-in brightness pairs (AdamW, so the LoRA moves as in
training), each step's loss and whether any LoRA gradient is NaN/inf. A step with a non-finite
gradient is not applied (as in training). The report lists, per kernel set, how many steps had
non-finite gradients and the first of them.

Why: on an H100 with torch 2.11, tiny FLUX in bf16 got NaN gradient norms on some batches while
the loss stayed finite; fp32 and the CPU never did. cuDNN attention's backward has known NaN bugs
on SM90 (pytorch #196678, NVIDIA/cudnn-frontend #1072). If only the sets that include ``cudnn``
show it, ``train.sdpa_backends=[flash,efficient,math]`` is the fix to recommend or default to.

Usage (on a GPU machine; kernels a device lacks are reported as unavailable)::

    python bench/attention_nan.py                       # tiny flux, bf16, 60 steps, every set
    python bench/attention_nan.py --family sdxl --steps 200 --dtype fp16
    python bench/attention_nan.py --size full --family flux --steps 20   # FLUX.1-dev's architecture
    python bench/attention_nan.py --device cpu --steps 5   # the code path, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
from sizes import add_size_arguments
from torch.nn.attention import SDPBackend, sdpa_kernel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KERNEL_SETS = {
    "default": None,
    "math": [SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_steps(family: str, size: str, device: str, dtype: torch.dtype, steps: int, kernels) -> dict:
    """``steps`` DPO steps from seed 0 under ``kernels``: losses and the steps with non-finite grads."""
    from diffalign import lora
    from diffalign.config import load_config
    from diffalign.data import EpochSampler, collate_pairs, open_preference_pairs
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer
    from sizes import build_policy

    torch.manual_seed(0)
    cfg = load_config({"method": "diffusion_dpo", "model": f"tiny-{family}", "lora": {"rank": 16},
                       "data": {"source": "builtin:brightness"}})
    policy = build_policy(family, size, device, dtype, resolution=64 if size == "tiny" else None)
    resolution = policy.default_resolution()
    params = lora.add_lora(policy.denoiser, policy.family, cfg.lora)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    trainer = DiffusionDPOTrainer(cfg)
    pairs = open_preference_pairs(cfg.data.source)
    sampler = EpochSampler(len(pairs), 2, 0, 0, 1)
    generator = torch.Generator().manual_seed(0)
    bad, losses = [], []
    for step in range(1, steps + 1):
        epoch, indices = sampler.next_indices()
        batch = collate_pairs(pairs, indices, resolution, 0, epoch, True, True)
        with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = trainer.dpo_step(policy, batch, generator)
            loss.backward()
        losses.append(loss.item())
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
            bad.append(step)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"bad": bad, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, family="flux")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sets", nargs="+", default=list(KERNEL_SETS), choices=list(KERNEL_SETS))
    args = parser.parse_args()
    print(f"{args.size} {args.family} on {args.device} in {args.dtype}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}, {args.steps} DPO steps per kernel set")
    for name in args.sets:
        try:
            result = run_steps(args.family, args.size, args.device, DTYPES[args.dtype], args.steps, KERNEL_SETS[name])
        except RuntimeError as err:  # e.g. "No available kernel" for a set the device lacks
            print(f"{name:>10}: unavailable ({str(err).splitlines()[0][:100]})")
            continue
        bad, losses = result["bad"], result["losses"]
        finite = all(torch.isfinite(torch.tensor(losses)).tolist())
        print(f"{name:>10}: {len(bad)}/{args.steps} steps with non-finite gradients"
              + (f" (first: step {bad[0]})" if bad else "") + f"; losses {'finite' if finite else 'NOT finite'}, "
              f"last {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
