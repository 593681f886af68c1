"""How much each shapes model's denoiser uses its prompt: the training loss with the right caption,
a wrong one and "" on the same noisy world images.

    python bench/shapes_text_use.py                         # the four shipped shapes models
    python bench/shapes_text_use.py shapes-flux /path/to/a/world-build --images 64

For each model, a batch of world images (training captions, fixed seeds) is noised at a few
levels, given as a fraction of the schedule (DDPM timestep / 1000 for SD and SDXL, sigma for FLUX
and SD3, so the same fraction is not the same signal-to-noise ratio across the two kinds). At each
level it prints the denoiser's MSE to its training target (epsilon or flow velocity) with the
right caption, and how many times larger it is with the captions rotated by one (another image's
caption) and with "". A model that ignores its text scores about 1.0x for both: its samples then
follow the starting noise, not the prompt.
"""

from __future__ import annotations

import argparse

import torch

LEVELS = (0.2, 0.5, 0.8, 0.95, 0.99)


def text_use(model: str, images: int, seed: int = 0) -> list[dict[str, float]]:
    from diffalign.pipelines.loading import detect_family, load_pipeline
    from diffalign.rewards.shapes_world import sample_captions
    from diffalign.world import world_batch, world_policy

    family = detect_family(model)
    policy = world_policy(load_pipeline(model), family)
    captions = sample_captions(images, seed=seed)
    wrong = captions[1:] + captions[:1]
    latents = policy.encode_images(world_batch(captions, range(images)), generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1))
    scale = 999 if family in ("sd", "sdxl") else 1000
    rows = []
    with torch.no_grad():
        conds = {name: policy.encode_prompts(prompts)
                 for name, prompts in (("right", captions), ("wrong", wrong), ("empty", [""] * images))}
        for level in LEVELS:
            t = torch.full((images,), float(round(level * scale)))
            x_t, target = policy.noise(latents, noise, t), policy.target(latents, noise, t)
            mse = {name: float(((policy.predict(x_t, t, cond) - target) ** 2).mean()) for name, cond in conds.items()}
            rows.append({"level": level, "right": mse["right"], "wrong": mse["wrong"] / mse["right"],
                         "empty": mse["empty"] / mse["right"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["shapes-sd", "shapes-sdxl", "shapes-flux", "shapes-sd3"])
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args(argv)
    print("| model | level | MSE, right caption | wrong caption | \"\" |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for row in text_use(model, args.images):
            print(f"| {model} | {row['level']:.2f} | {row['right']:.4f} | {row['wrong']:.2f}x | {row['empty']:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
