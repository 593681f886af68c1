"""Does training on "the brighter image wins" make *sampled* images brighter? Per tiny family and
objective: Diffusion-DPO on builtin:brightness, and plain denoising (dpo.loss: sft) on the same
winners, then the mean ``brightness`` of deterministic samples (fixed prompts, seed i, DDIM / flow
ODE) with the LoRA against the base (the same policy, adapter off), at guidance 1 and at the
family's CFG scale.

This is the measurement behind issue 10 item 3 (the old tiny-SDXL quickstart raised held-out
preference accuracy while its samples got darker): on the random epsilon-prediction UNets the
sampled brightness does not follow the objective, on the flow model it does. Numbers measured on
a 2-core CPU (100 steps, lr 1e-3, beta 500, 16 prompts): DPO sd 0.4964 -> 0.5252, sdxl 0.4928 ->
0.4720, flux 0.5208 -> 0.5513; SFT sdxl 0.4928 -> 0.4666.

Usage::

    python bench/sampled_brightness.py                          # every tiny family, DPO and SFT, 100 steps
    python bench/sampled_brightness.py --models tiny-sdxl --steps 40 --losses sigmoid
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch


def mean_brightness(policy, prompts: list[str], guidance: float, lora_on: bool, steps: int) -> float:
    from diffalign.rewards import load_reward
    from diffalign.training import sample_images

    reward = load_reward("brightness")
    scores = []
    with torch.no_grad(), contextlib.nullcontext() if lora_on else policy.reference():
        for i, prompt in enumerate(prompts):  # prompt i with seed i, as `diffalign generate --prompts`
            scores.append(reward(sample_images(policy, [prompt], i, steps, guidance), [prompt]).item())
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sdxl", "tiny-flux"])
    parser.add_argument("--losses", nargs="+", default=["sigmoid", "sft"], choices=["sigmoid", "sft"])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()

    from diffalign.config import load_config
    from diffalign.data import BUILTIN_PROMPTS
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer
    from diffalign.training import DEFAULT_GUIDANCE

    prompts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(args.prompts)]
    print(f"{'model':10} {'loss':8} {'guidance':>8} {'base':>8} {'lora':>8} {'change':>8}")
    for model in args.models:
        for loss in args.losses:
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config({
                    "method": "diffusion_dpo", "model": model, "output_dir": out, "seed": 0,
                    "lora": {"rank": 8, "alpha": 16},
                    "train": {"max_steps": args.steps, "learning_rate": 1e-3, "batch_size": 4, "warmup_steps": 10,
                              "checkpoint_every": 0},
                    "dpo": {"beta": 500.0, "loss": loss}, "data": {"source": "builtin:brightness"},
                    "logging": {"sample_every": 0},
                })
                trainer = DiffusionDPOTrainer(cfg, overwrite=True)
                trainer.train()
                policy = trainer.policy
                for guidance in sorted({1.0, DEFAULT_GUIDANCE[policy.family]}):
                    base = mean_brightness(policy, prompts, guidance, False, args.sample_steps)
                    tuned = mean_brightness(policy, prompts, guidance, True, args.sample_steps)
                    print(f"{model:10} {loss:8} {guidance:8.1f} {base:8.4f} {tuned:8.4f} {tuned - base:+8.4f}", flush=True)


if __name__ == "__main__":
    main()
