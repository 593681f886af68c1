"""Rollout cost: sampling with per-step log-probabilities vs the stock pipeline, and a GRPO step
vs its bare denoiser passes.

1. rollout  ``policy.encode_prompts`` + ``policy.sample`` (every transition recorded, its Gaussian
            log-probability computed, latents kept, images decoded) against the stock pipeline
            ``__call__`` for the same prompts, steps, batch, guidance and starting latents (SD/SDXL:
            DDIM with the same eta; FLUX and SD3: the stock Euler ODE, ours the flow SDE with a = 0.7,
            so the extra noise draws count against us; SD3's CFG is the stock true CFG against ""). Goal: policy / stock <= 1.05.
2. grpo     one GRPO update on a micro-batch, ``GRPOTrainer.grpo_step`` + backward on every sampler
            step of a recorded trajectory, against the bare passes it needs: the denoiser forward
            (with CFG when sampling used it) + backward of a plain loss at the same inputs, plus, with
            ``--kl``, the no-grad reference forward. Reported as step / bare.

3. window   a round's update cost with and without the SDE window (``--window W``, Flow-GRPO-Fast):
            the training passes per round (images x trained sampler steps; each pass is a denoiser
            forward + backward) and the time of a round (sampling it + every update pass), for the
            SDE at every step trained on every step, against the ODE outside a window of W steps
            trained on the window only.

All interleave the timed functions each repeat (drift affects all alike) and report medians.

    python bench/rollout.py                                  # the tiny models on the CPU
    python bench/rollout.py --size small --families sd flux  # compute-bound on a CPU (bench/sizes.py)
    python bench/rollout.py --size full --families sdxl --resolution 512 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from sizes import FAMILIES, add_size_arguments, build_policy
from timing import timed_interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(parser)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="families to measure (--family is ignored here)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8, help="images per rollout (and per GRPO micro-batch)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale; default: the family's")
    parser.add_argument("--kl", type=float, default=0.0, help="GRPO kl_beta (adds the reference pass)")
    parser.add_argument("--window", type=int, default=3, help="SDE window size W for the update-cost line (0: skip)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=8)
    return parser.parse_args()


def interleaved(fns: dict, device: str, repeats: int, reset=lambda: None) -> dict[str, float]:
    """Median seconds of each function, timed in turn each repeat (see bench/timing.py)."""
    return {name: seconds for name, (seconds, _) in timed_interleaved(fns, device, repeats, reset).items()}


def load(family: str, size: str, device: str, dtype: torch.dtype, resolution: int | None):
    return build_policy(family, size, device, dtype, resolution)


def bench_rollout(policy, args, prompts: list[str], guidance: float, noise_level: float) -> dict[str, float]:
    from diffusers import DDIMScheduler

    pipe = policy.pipe
    size = policy.default_resolution()
    flux = policy.family == "flux"
    if policy.prediction_type != "flow":  # the stock call uses the same DDIM schedule the policy samples with
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = policy.initial_noise(len(prompts), size, size, torch.Generator().manual_seed(0))
    stock_kwargs = dict(num_inference_steps=args.steps, height=size, width=size, output_type="pt")
    if flux:
        stock_kwargs.update(guidance_scale=policy.embedded_guidance, max_sequence_length=policy.max_sequence_length,
                            latents=pipe._pack_latents(latents, *latents.shape))
        if guidance != 1.0:
            stock_kwargs.update(true_cfg_scale=guidance, negative_prompt=[""] * len(prompts))
    elif policy.family == "sd3":  # its stock scheduler; guidance_scale is true CFG against ""
        stock_kwargs.update(guidance_scale=guidance, max_sequence_length=policy.max_sequence_length,
                            latents=latents.to(policy.dtype))
    else:
        stock_kwargs.update(guidance_scale=guidance, eta=noise_level, latents=latents.to(policy.dtype))

    def stock():
        pipe(list(prompts), generator=torch.Generator().manual_seed(1), **stock_kwargs)

    def ours(level: float):
        def run():
            with torch.no_grad():
                cond = policy.encode_prompts(prompts, with_uncond=guidance != 1.0, height=size, width=size)
                policy.sample(cond, args.steps, guidance_scale=guidance, noise_level=level,
                              generator=torch.Generator().manual_seed(1), latents=latents)
        return run

    return interleaved({"stock": stock, "sample+logprob": ours(noise_level), "sample, no noise": ours(0.0)},
                       args.device, args.repeats)


def bench_grpo_step(policy, params, args, guidance: float, noise_level: float) -> dict[str, float]:
    from diffalign.config import load_config
    from diffalign.trainers.pref_grpo import GRPOTrainer

    group = 4 if args.batch % 4 == 0 else args.batch
    cfg = load_config({
        "method": "grpo", "model": "tiny-sd",
        "train": {"batch_size": args.batch},
        "grpo": {"reward": "brightness", "group_size": group, "prompts_per_round": args.batch // group,
                 "num_steps": args.steps, "guidance_scale": guidance, "noise_level": noise_level,
                 "kl_beta": args.kl},
    })
    trainer = GRPOTrainer(cfg)
    prompts = [f"a photo of object {i}" for i in range(args.batch // group)]
    trajectory = trainer.sample_round(policy, prompts, torch.Generator().manual_seed(2))
    advantages = torch.randn(args.batch, generator=torch.Generator().manual_seed(3))

    def step():
        for j in range(args.steps):
            loss, _ = trainer.grpo_step(policy, trajectory, advantages, j)
            loss.backward()

    def bare():
        for j in range(args.steps):
            out = policy.predict(trajectory.latents[:, j], trajectory.timesteps[j], trajectory.cond, guidance)
            out.pow(2).mean().backward()
            if args.kl > 0:
                with torch.no_grad(), policy.reference():
                    policy.predict(trajectory.latents[:, j], trajectory.timesteps[j], trajectory.cond, guidance)

    def reset():
        for p in params:
            p.grad = None

    return interleaved({"bare": bare, "grpo step": step}, args.device, args.repeats, reset)


def bench_window(policy, params, args, guidance: float, noise_level: float) -> dict[str, tuple[int, float]]:
    """{"full": (passes, seconds), "window": (passes, seconds)} for one round of ``args.batch`` images."""
    from diffalign.config import load_config
    from diffalign.trainers.grpo_maths import candidate_steps
    from diffalign.trainers.pref_grpo import GRPOTrainer

    group = 4 if args.batch % 4 == 0 else args.batch
    prompts = [f"a photo of object {i}" for i in range(args.batch // group)]
    advantages = torch.randn(args.batch, generator=torch.Generator().manual_seed(3))
    passes, fns = {}, {}
    for name, size in (("full", 0), ("window", args.window)):
        cfg = load_config({
            "method": "grpo", "model": "tiny-sd", "train": {"batch_size": args.batch},
            "grpo": {"reward": "brightness", "group_size": group, "prompts_per_round": args.batch // group,
                     "num_steps": args.steps, "guidance_scale": guidance, "noise_level": noise_level,
                     "sde_window_size": size},
        })
        trainer = GRPOTrainer(cfg)
        window = (0, size) if size else None
        steps = candidate_steps(args.steps, window=window)
        passes[name] = args.batch * len(steps)

        def round_(trainer=trainer, window=window, steps=steps):
            with torch.no_grad():
                trajectory = trainer.sample_round(policy, prompts, torch.Generator().manual_seed(2), window)
            for j in steps:
                loss, _ = trainer.grpo_step(policy, trajectory, advantages, j)
                loss.backward()
        fns[name] = round_

    def reset():
        for p in params:
            p.grad = None

    times = interleaved(fns, args.device, args.repeats, reset)
    return {name: (passes[name], times[name]) for name in fns}


def main() -> int:
    args = parse_args()
    from diffalign import lora
    from diffalign.config import LoraSettings
    from diffalign.trainers.d3po import DEFAULT_NOISE_LEVEL
    from diffalign.training import DEFAULT_GUIDANCE

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    print(f"device {args.device}, {args.dtype}, batch {args.batch}, {args.steps} steps, median of {args.repeats}"
          f" (torch threads {torch.get_num_threads()})")
    for family in args.families:
        model = f"{args.size} {family}"
        policy = load(family, args.size, args.device, dtype, args.resolution)
        guidance = DEFAULT_GUIDANCE[policy.family] if args.guidance is None else args.guidance
        noise_level = DEFAULT_NOISE_LEVEL[policy.family]
        size = policy.default_resolution()
        rollout = bench_rollout(policy, args, prompts, guidance, noise_level)
        ratio = rollout["sample+logprob"] / rollout["stock"]
        print(f"\n{model} ({policy.family}), {size}px, CFG {guidance}, noise level {noise_level}")
        for name, seconds in rollout.items():
            print(f"  rollout {name:>16}: {seconds * 1000:9.1f} ms  ({seconds / rollout['stock']:.3f}x stock)")
        print(f"  sampling with log-probs / stock __call__: {ratio:.3f}x (goal <= 1.05x): {'met' if ratio <= 1.05 else 'NOT met'}")

        params = lora.add_lora(policy.denoiser, policy.family, LoraSettings(rank=args.rank))
        with torch.no_grad():  # a non-zero LoRA, as mid-training
            for p in params:
                p.normal_(0, 0.01)
        grpo = bench_grpo_step(policy, params, args, guidance, noise_level)
        print(f"  GRPO update over {args.steps} steps, {args.batch} images: bare {grpo['bare'] * 1000:.1f} ms, "
              f"step {grpo['grpo step'] * 1000:.1f} ms ({grpo['grpo step'] / grpo['bare']:.3f}x bare)"
              + (f", kl_beta {args.kl}" if args.kl else ""))
        if args.window:
            cost = bench_window(policy, params, args, guidance, noise_level)
            (full_passes, full_s), (win_passes, win_s) = cost["full"], cost["window"]
            print(f"  update cost per round of {args.batch} images: SDE on all {args.steps} steps {full_passes} training "
                  f"passes, {full_s * 1000:.1f} ms; SDE window of {args.window} {win_passes} passes, {win_s * 1000:.1f} ms "
                  f"({win_passes / full_passes:.2f}x the passes, {win_s / full_s:.2f}x the time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
