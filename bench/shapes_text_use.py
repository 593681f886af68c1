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

A second table compares the families on one scale: the error of the denoised image (the x0 each
denoiser's output implies, on the three latent channels that hold a cell's RGB in every shapes
VAE) at the same signal-to-noise ratio, named by the flow sigma (SD/SDXL use the DDPM timestep
whose alpha-bar gives that ratio), with the right caption and how many times larger it is with "".
"""

from __future__ import annotations

import argparse

import torch

LEVELS = (0.2, 0.5, 0.8, 0.95, 0.99)
SIGMAS = (0.3, 0.5, 0.7, 0.9, 0.95)  # flow sigma; the matched SNR for the DDPM families


def _noised_world(model: str, images: int, seed: int):
    """The model's family and policy, ``images`` training captions, their world latents and a fixed noise."""
    from diffalign.pipelines.loading import detect_family, load_pipeline
    from diffalign.rewards.shapes_world import sample_captions
    from diffalign.world import world_batch, world_policy

    family = detect_family(model)
    policy = world_policy(load_pipeline(model), family)
    captions = sample_captions(images, seed=seed)
    latents = policy.encode_images(world_batch(captions, range(images)), generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1))
    return family, policy, captions, latents, noise


def text_use(model: str, images: int, seed: int = 0) -> list[dict[str, float]]:
    family, policy, captions, latents, noise = _noised_world(model, images, seed)
    wrong = captions[1:] + captions[:1]
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


def denoised_error(model: str, images: int, seed: int = 0) -> list[dict[str, float]]:
    """Per flow sigma in SIGMAS: MSE of the implied x0 on the RGB latent channels, right caption,
    and its ratio with "" (SD/SDXL at the DDPM timestep of the same signal-to-noise ratio)."""
    from diffalign.pipelines.samplers import predicted_x0_and_eps

    family, policy, captions, latents, noise = _noised_world(model, images, seed)
    rows = []
    with torch.no_grad():
        conds = {"right": policy.encode_prompts(captions), "empty": policy.encode_prompts([""] * images)}
        for sigma in SIGMAS:
            if family in ("sd", "sdxl"):
                snr = ((1 - sigma) / sigma) ** 2
                step = int((policy.alphas_cumprod - snr / (1 + snr)).abs().argmin())
                t = torch.full((images,), float(step))
                x_t = policy.noise(latents, noise, t)
                alpha = policy.alphas_cumprod[step]

                def x0(cond):
                    return predicted_x0_and_eps(policy.predict(x_t, t, cond), x_t, alpha, policy.prediction_type)[0]
            else:
                t = torch.full((images,), sigma * 1000.0)
                x_t = policy.noise(latents, noise, t)

                def x0(cond):
                    return x_t - sigma * policy.predict(x_t, t, cond)
            mse = {name: float(((x0(cond) - latents)[:, :3] ** 2).mean()) for name, cond in conds.items()}
            rows.append({"sigma": sigma, "right": mse["right"], "empty": mse["empty"] / mse["right"]})
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
    print("\n| model | " + " | ".join(f"x0 error at sigma {s}" for s in SIGMAS) + " |")
    print("|---|" + "---|" * len(SIGMAS))
    for model in args.models:
        cells = [f"{row['right']:.4f} ({row['empty']:.2f}x)" for row in denoised_error(model, args.images)]
        print(f"| {model} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
