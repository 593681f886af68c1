"""Stable Diffusion 1.x / 2.x policy (``StableDiffusionPipeline``; epsilon or v-prediction)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Conditioning, DiffusionPolicy, sample_posterior
from .samplers import ddim_step_with_logprob


class SDPolicy(DiffusionPolicy):
    """A DDPM-type UNet policy. Sampling uses DDIM with ``eta = noise_level``.

    The sampling scheduler is a ``DDIMScheduler`` built from the pipeline's scheduler config
    (same betas, whatever scheduler the checkpoint ships); the pipeline's own is left untouched.
    """

    family = "sd"

    def __init__(self, pipe, resolution: int | None = None) -> None:
        from diffusers import DDIMScheduler

        super().__init__(pipe, pipe.unet)
        self.resolution = resolution
        # diffalign's DDIM step does not clip or threshold x0 (SD and SDXL are trained without);
        # configs of other schedulers may lack these keys, and DDIM's defaults would turn clipping on.
        config = pipe.scheduler.config
        if config.get("clip_sample") or config.get("thresholding"):
            raise ValueError("schedulers with clip_sample or thresholding are not supported by diffalign's DDIM sampler")
        self.ddim = DDIMScheduler.from_config(
            config, clip_sample=False, thresholding=False, set_alpha_to_one=config.get("set_alpha_to_one", False)
        )
        self.prediction_type: str = self.ddim.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                "diffalign trains epsilon and v_prediction UNets"
            )
        self.num_train_timesteps: int = self.ddim.config.num_train_timesteps
        self.alphas_cumprod = self.ddim.alphas_cumprod.float()
        self.final_alpha_cumprod = float(self.ddim.final_alpha_cumprod)

    # --- shapes -----------------------------------------------------------------------------

    def default_resolution(self) -> int:
        return self.resolution or self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return (self.denoiser.config.in_channels, height // f, width // f)

    # --- text and images --------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        with_uncond: bool = False,
        **micro_conditioning,
    ) -> Conditioning:
        """Encode B prompts. ``uncond`` is set from ``negative_prompts`` or, with
        ``with_uncond``, from the empty prompt (for classifier-free guidance)."""
        do_cfg = negative_prompts is not None or with_uncond
        embeds, negative = self.pipe.encode_prompt(
            list(prompts), self.device, 1, do_cfg,
            negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
        )
        uncond = Conditioning(embeds=negative) if do_cfg else None
        return Conditioning(embeds=embeds, uncond=uncond)

    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] (fp32, scaled)."""
        return self.latents_from_posterior(self.vae_posterior(pixels), generator)

    def latents_from_posterior(self, posterior: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A sample of the VAE posterior whose parameters are ``posterior`` [B, 2C, h, w] (see
        :meth:`vae_posterior`), scaled: the latents ``encode_images`` gives, with the same RNG draw."""
        return sample_posterior(posterior, generator) * self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (fp32, differentiable)."""
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # --- forward process ----------------------------------------------------------------------

    def _alpha(self, t: Tensor) -> Tensor:
        """Cumulative alpha at timestep(s) t; ``final_alpha_cumprod`` where t < 0."""
        t = torch.as_tensor(t, device="cpu")
        alphas = self.alphas_cumprod[t.clamp(min=0).long()]
        alphas = torch.where(t >= 0, alphas, torch.full_like(alphas, self.final_alpha_cumprod))
        return alphas.to(self.device)

    def _broadcast_alpha(self, t: Tensor, like: Tensor) -> Tensor:
        a = self._alpha(t)
        return a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a

    def noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (fp32)."""
        a = self._broadcast_alpha(t, latents)
        return a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()

    def target(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The training target: noise (epsilon) or v = sqrt(a) noise - sqrt(1-a) x0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        a = self._broadcast_alpha(t, latents)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()

    def training_timesteps(self, batch_size: int, generator: torch.Generator | None = None, scheme: str = "uniform") -> Tensor:
        """Timesteps [B] drawn uniformly from [0, num_train_timesteps)."""
        g_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=g_device)
        return t.to(self.device)

    # --- sampling -----------------------------------------------------------------------------

    def schedule(self, num_steps: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """DDIM timesteps [T] (descending) and the previous timestep of each [T] (-k past the end)."""
        self.ddim.set_timesteps(num_steps)
        timesteps = self.ddim.timesteps.clone().long()
        next_timesteps = timesteps - self.num_train_timesteps // num_steps
        return timesteps.to(self.device), next_timesteps.to(self.device)

    def step(self, model_output, x_t, t, t_next, noise_level, timesteps, prev_sample=None, generator=None):
        """DDIM step with eta = noise_level (see ``ddim_step_with_logprob``)."""
        return ddim_step_with_logprob(
            model_output, x_t, self._alpha(t), self._alpha(t_next), noise_level,
            self.prediction_type, prev_sample=prev_sample, generator=generator,
        )

    def _denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.denoiser(
            x_t.to(self.dtype), t, encoder_hidden_states=cond.embeds.to(self.dtype), return_dict=False
        )[0]
