"""Stable Diffusion 3 / 3.5 policy (``StableDiffusion3Pipeline``): an MMDiT
(``SD3Transformer2DModel``) over 2x2 latent patches, conditioned on CLIP-L + CLIP-G pooled
embeddings and the joint CLIP + T5 token sequence; rectified flow with the scheduler's shift.

It is a flow-matching family like FLUX, so it reuses :class:`FluxPolicy`'s forward process,
training target, image encode/decode (shift and scale) and flow SDE step, and replaces what
differs: prompt encoding (three encoders, no distilled-guidance embedding), the denoiser call
(unpacked latents, timesteps in [0, 1000]) and the schedule (the stock SD3 one: the
scheduler's static ``shift``, or its dynamic shift when configured). Guidance is true
classifier-free guidance against a negative prompt ("" by default), as the stock pipeline does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Conditioning
from .flux import FluxPolicy


class SD3Policy(FluxPolicy):
    """Flow-matching policy for SD3 / SD3.5: x_sigma = (1 - sigma) x0 + sigma noise, target
    velocity noise - x0, sampling with Flow-GRPO's SDE (``noise_level`` a; 0 = the stock Euler
    ODE sampler, which equals ``pipe(...)`` with the same latents).

    max_sequence_length: T5 tokens (the stock default is 256; the tiny model uses 32).
    """

    family = "sd3"

    def __init__(self, pipe, resolution: int | None = None, max_sequence_length: int = 256) -> None:
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        self.embedded_guidance = None  # SD3 has no distilled-guidance embedder

    def default_resolution(self) -> int:
        return self.resolution or 1024

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor * self.denoiser.config.patch_size
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        s = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // s, width // s)

    # --- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> Conditioning:
        """CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to T5's width) followed
        by the T5 tokens: embeds [B, 77 + L, D]; pooled [B, P] = both CLIPs' projected EOS."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(embeds=embeds, pooled=pooled)

    # --- sampling -----------------------------------------------------------------------------

    def schedule(self, num_steps: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The stock SD3 schedule: ``scheduler.set_timesteps(num_steps)`` (sigmas from 1 to the
        shifted sigma_min, shifted by ``shift``, or by the resolution's mu with dynamic shifting).
        Returns model timesteps [T] = 1000 * sigma and where each step lands [T] (0 last)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        config = self.flow_scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            _, h, w = self.latent_shape(height, width)
            p = self.denoiser.config.patch_size
            mu = calculate_shift(
                (h // p) * (w // p), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16),
            )
        self.flow_scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        all_sigmas = self.flow_scheduler.sigmas.float().to(self.device)
        return all_sigmas[:-1] * 1000.0, all_sigmas[1:] * 1000.0

    def _denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=t.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            pooled_projections=cond.pooled.to(self.dtype),
            return_dict=False,
        )[0]
