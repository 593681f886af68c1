"""FLUX.1 policy (``FluxPipeline``): rectified-flow transformer over packed 2x2 latent patches,
CLIP pooled + T5 sequence conditioning, optional distilled-guidance embedding."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Conditioning, DiffusionPolicy, sample_posterior
from .samplers import flow_cps_step_with_logprob, flow_sde_step_with_logprob


class FluxPolicy(DiffusionPolicy):
    """Flow-matching policy: x_sigma = (1 - sigma) x0 + sigma noise, target velocity noise - x0.

    Sampling uses Flow-GRPO's SDE with ``a = noise_level`` (0 = the stock Euler ODE sampler).
    ``embedded_guidance`` feeds the guidance embedder of guidance-distilled checkpoints
    (FLUX.1-dev); classifier-free guidance with a negative prompt ("true CFG") goes through
    ``predict(guidance_scale=...)`` like every family.
    """

    family = "flux"
    sde_types = ("sde", "cps", "memoryless")

    def __init__(
        self,
        pipe,
        resolution: int | None = None,
        embedded_guidance: float = 3.5,
        max_sequence_length: int = 512,
    ) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe, pipe.transformer)
        self.resolution = resolution
        self.embedded_guidance = embedded_guidance
        self.max_sequence_length = max_sequence_length
        self.prediction_type = "flow"
        self.flow_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def default_resolution(self) -> int:
        return self.resolution or 1024

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor * 2  # VAE downsampling times the 2x2 packing
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return (self.denoiser.config.in_channels // 4, 2 * (height // f), 2 * (width // f))

    # --- text and images --------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        with_uncond: bool = False,
        **micro_conditioning,
    ) -> Conditioning:
        """Encode B prompts (T5 sequence, CLIP pooled, text ids, guidance value).

        ``uncond`` (for true CFG) comes from ``negative_prompts`` or, with ``with_uncond``, "".
        """
        cond = self._encode(list(prompts))
        if negative_prompts is not None or with_uncond:
            negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
            cond.uncond = self._encode(negatives)
        return cond

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((len(prompts),), self.embedded_guidance, device=self.device)
        return Conditioning(embeds=embeds, pooled=pooled, text_ids=text_ids, guidance=guidance)

    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] (fp32, shifted and scaled)."""
        return self.latents_from_posterior(self.vae_posterior(pixels), generator)

    def latents_from_posterior(self, posterior: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A sample of the VAE posterior ``posterior`` [B, 2C, h, w] (see :meth:`vae_posterior`),
        shifted and scaled: the latents ``encode_images`` gives, with the same RNG draw."""
        z = sample_posterior(posterior, generator)
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (fp32, differentiable)."""
        z = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # --- forward process ----------------------------------------------------------------------

    @staticmethod
    def _sigma(t: Tensor, like: Tensor) -> Tensor:
        s = torch.as_tensor(t, device=like.device).float() / 1000.0
        return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s

    def noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_sigma = (1 - sigma) x0 + sigma noise, with sigma = t / 1000 (fp32)."""
        s = self._sigma(t, latents)
        return (1 - s) * latents.float() + s * noise.float()

    def target(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The flow-matching target: velocity = noise - x0."""
        return noise.float() - latents.float()

    def training_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, scheme: str = "logit_normal"
    ) -> Tensor:
        """Timesteps [B] = 1000 * sigma, sigma ~ logit-normal(0, 1) (SD3/FLUX) or uniform(0, 1)."""
        g_device = generator.device if generator is not None else "cpu"
        if scheme == "logit_normal":
            sigma = torch.sigmoid(torch.randn(batch_size, generator=generator, device=g_device))
        elif scheme == "uniform":
            sigma = torch.rand(batch_size, generator=generator, device=g_device)
        else:
            raise ValueError(f"timestep scheme must be 'logit_normal' or 'uniform', got {scheme!r}")
        return (sigma * 1000.0).to(self.device)

    # --- sampling -----------------------------------------------------------------------------

    def schedule(self, num_steps: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The stock FLUX schedule: sigmas linspace(1, 1/T) shifted by the resolution-dependent
        mu; returns model timesteps [T] = 1000 * sigma and where each step lands [T] (0 last)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = self.latent_shape(height, width)
        config = self.flow_scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                (h // 2) * (w // 2), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.15),
            )
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        self.flow_scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
        all_sigmas = self.flow_scheduler.sigmas.float().to(self.device)
        return all_sigmas[:-1] * 1000.0, all_sigmas[1:] * 1000.0

    def step(self, model_output, x_t, t, t_next, noise_level, timesteps, prev_sample=None, generator=None,
             sde_type="sde"):
        """A flow step with its log-prob: Flow-GRPO's SDE (``"sde"``; at sigma = 1 only the
        denominator is guarded with the schedule's second sigma, as in the reference), the
        coefficients-preserving step (``"cps"``), or the SDE with sigma capped in the numerator
        too (``"memoryless"``: Adjoint Matching, see ``samplers.flow_sde_std``)."""
        sigma = torch.as_tensor(t).float() / 1000.0
        sigma_next = torch.as_tensor(t_next).float() / 1000.0
        if sde_type == "cps":
            return flow_cps_step_with_logprob(model_output, x_t, sigma, sigma_next, noise_level,
                                              prev_sample=prev_sample, generator=generator)
        if sde_type not in ("sde", "memoryless"):
            raise ValueError(f"sde_type must be one of {', '.join(self.sde_types)}, got {sde_type!r}")
        sigma_max = float(timesteps[1]) / 1000.0 if len(timesteps) > 1 else 0.99
        return flow_sde_step_with_logprob(
            model_output, x_t, sigma, sigma_next, noise_level, sigma_max, prev_sample=prev_sample,
            generator=generator, memoryless_cap=sde_type == "memoryless",
        )

    def _denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        batch, channels, h, w = x_t.shape
        packed = self.pipe._pack_latents(x_t.to(self.dtype), batch, channels, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(batch, h // 2, w // 2, x_t.device, self.dtype)
        out = self.denoiser(
            hidden_states=packed,
            timestep=(t / 1000.0).to(self.dtype),
            guidance=cond.guidance,
            pooled_projections=cond.pooled.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            txt_ids=cond.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.pipe._unpack_latents(out, h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor,
                                         self.pipe.vae_scale_factor)
