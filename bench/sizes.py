"""Model sizes every bench script accepts (``--size tiny | small | full``, ``--device``).

* ``tiny``: the embedded random ``tiny-*`` models (64 px): exercises the code, but fixed costs
  dominate, so ratios measured on them say little.
* ``small``: the tiny pipeline of the family with a wider denoiser (same class; UNets with twice
  the channels, transformers with 4x the heads and two blocks) at 128 px, so that one denoiser
  forward takes at least 50 ms on a CPU core and compute dominates the ratios. Each script prints
  the forward time it measured.
* ``full``: the published architecture (SDXL base 1.0, FLUX.1-dev, SD3.5 Medium) with random
  weights at its published resolution, for a GPU (bf16). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = ("tiny", "small", "full")
FAMILIES = ("sd", "sdxl", "flux", "sd3")
SMALL_RESOLUTION = 128
FULL_RESOLUTION = {"sd": 512, "sdxl": 1024, "flux": 1024, "sd3": 512}


def add_size_arguments(parser: argparse.ArgumentParser, family: str = "sdxl") -> None:
    """``--size``, ``--family`` and ``--device`` (default: cuda if available)."""
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny | small | full (see bench/sizes.py)")
    parser.add_argument("--family", choices=FAMILIES, default=family)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _widen_denoiser(pipe, family: str) -> None:
    """Replace the tiny pipeline's denoiser by the same class with a wider config (small)."""
    if family in ("sd", "sdxl"):
        unet = pipe.unet
        config = dict(unet.config)
        config.update(block_out_channels=[c * 2 for c in config["block_out_channels"]],
                      norm_num_groups=16, sample_size=SMALL_RESOLUTION // pipe.vae_scale_factor)
        pipe.unet = type(unet).from_config(config).eval().requires_grad_(False)
    else:
        transformer = pipe.transformer
        config = dict(transformer.config)
        config.update(num_attention_heads=config["num_attention_heads"] * 4, num_layers=2)
        if "num_single_layers" in config:
            config["num_single_layers"] = 2
        if family == "sd3":
            config["sample_size"] = SMALL_RESOLUTION // pipe.vae_scale_factor
            config["caption_projection_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
        pipe.transformer = type(transformer).from_config(config).eval().requires_grad_(False)


def build_policy(family: str, size: str, device: str, dtype: torch.dtype = torch.float32, resolution: int | None = None):
    """The policy of ``family`` at ``size`` on ``device`` (see the module docstring)."""
    from diffalign.pipelines.loading import load_policy, policy_for

    if size == "tiny":
        return load_policy(f"tiny-{family}", device=device, torch_dtype=dtype, resolution=resolution)
    if size == "small":
        from diffalign.pipelines.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(f"tiny-{family}")
        torch.manual_seed(0)
        _widen_denoiser(pipe, family)
        pipe.to(device=device, dtype=dtype)
        options = {"max_sequence_length": 32} if family in ("flux", "sd3") else {}
        return policy_for(pipe, resolution=resolution or SMALL_RESOLUTION, **options)
    from diffalign.pipelines import reference_configs

    builder = getattr(reference_configs, f"build_random_{family}", None)
    if builder is None:
        raise SystemExit(f"--size full is not available for {family}: pipelines/reference_configs.py has no "
                         f"build_random_{family}")
    return policy_for(builder(device, dtype), resolution=resolution or FULL_RESOLUTION[family])


def denoiser_forward_ms(policy, batch: int, repeats: int = 3) -> float:
    """Median time of one no-grad denoiser forward on ``batch`` latents at the policy's resolution."""
    size = policy.default_resolution()
    cond = policy.encode_prompts(["a photo"] * batch)
    cond = policy.with_image_sizes(cond, size, size)
    x = torch.randn(batch, *policy.latent_shape(size, size), device=policy.device)
    t = policy.training_timesteps(batch, torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            if policy.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            policy.predict(x, t, cond)
            if policy.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2] * 1000
