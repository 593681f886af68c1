"""The Policy layer: one object per model family over a stock diffusers pipeline.

A policy wraps the pipeline object it is given and shares its components (never copies them).
It offers what every alignment method needs, in one vocabulary:

* ``encode_prompts`` -> :class:`Conditioning` (whatever the family's denoiser takes)
* ``encode_images`` / ``decode``: pixels in [-1, 1] -> latents -> images in [0, 1], differentiable
* ``noise`` / ``target``: the forward process and the training target (epsilon, v or velocity)
* ``predict``: the denoiser output, with classifier-free guidance when asked
* ``sample`` -> :class:`Trajectory` with per-step log-probabilities, gradients through the last
  K steps when asked; ``step_distribution`` / ``log_prob`` re-score a recorded transition
* ``reference()``: a context in which the LoRA adapter is disabled (the reference model)

Timesteps ``t`` are always in the units of the family's scheduler: integer DDPM timesteps in
[0, 1000) for SD/SDXL, ``sigma * 1000`` for flow models. Latents are unpacked ``[B, C, h, w]``
for every family (FLUX packs them into tokens inside ``predict``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .samplers import flow_static_shift_sigmas

# Conditioning fields that carry a batch dimension (text_ids is per-sequence, shared).
_BATCHED_FIELDS = ("embeds", "pooled", "time_ids", "guidance")


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, for a batch of B prompts.

    embeds:   [B, L, D] text encoder hidden states (SD/SDXL: encoder_hidden_states; FLUX: T5)
    pooled:   [B, P] pooled text embedding (SDXL ``text_embeds``, FLUX ``pooled_projections``)
    time_ids: [B, 6] SDXL micro-conditioning (original size, crop top-left, target size)
    text_ids: [L, 3] FLUX text position ids
    guidance: [B] FLUX distilled-guidance value fed to the guidance embedder
    uncond:   the unconditional / negative-prompt branch used by classifier-free guidance
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    text_ids: Tensor | None = None
    guidance: Tensor | None = None
    uncond: "Conditioning | None" = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map_batched(self, fn) -> "Conditioning":
        changes = {f: fn(getattr(self, f)) for f in _BATCHED_FIELDS if getattr(self, f) is not None}
        if self.uncond is not None:
            changes["uncond"] = self.uncond._map_batched(fn)
        return dataclasses.replace(self, **changes)

    def select(self, index: Tensor | slice | Sequence[int]) -> "Conditioning":
        """The rows ``index`` of the batch (for every branch)."""
        return self._map_batched(lambda x: x[index])

    def repeat(self, n: int) -> "Conditioning":
        """The whole batch repeated n times (B -> n*B, e.g. the same prompts for winners and losers)."""
        return self._map_batched(lambda x: x.repeat(n, *([1] * (x.ndim - 1))))

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each prompt repeated n times in a row (a group of n samples per prompt)."""
        return self._map_batched(lambda x: x.repeat_interleave(n, dim=0))

    def detach(self) -> "Conditioning":
        out = self._map_batched(lambda x: x.detach())
        return dataclasses.replace(out, text_ids=None if self.text_ids is None else self.text_ids.detach())

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate conditionings along the batch (branches are dropped)."""
        first = items[0]
        changes = {}
        for f in _BATCHED_FIELDS:
            if getattr(first, f) is not None:
                changes[f] = torch.cat([getattr(c, f) for c in items], dim=0)
        return dataclasses.replace(first, uncond=None, **changes)


def sample_posterior(posterior: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One fp32 sample of the diagonal Gaussian whose parameters (mean, log-variance on the
    channel axis) are ``posterior``: the draw diffusers' ``latent_dist.sample(generator)`` makes."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(posterior).sample(generator).float()


@dataclass
class Trajectory:
    """A batch of sampled denoising chains (x_T -> x_0 in ``num_steps`` steps).

    latents:        [B, T+1, C, h, w] fp32, detached; latents[:, 0] is the starting noise
    log_probs:      [B, T] log-probability of each transition at sampling time (mean over C,h,w)
    timesteps:      [T] the model timestep of each step; next_timesteps: [T] where it lands
                    (-1 for the DDIM step past the last timestep, 0 for flow)
    images:         [B, 3, H, W] in [0, 1] (carries gradients when sampled with grad_steps)
    final_latents:  [B, C, h, w] the last latents, with gradients when sampled with grad_steps
    cond, guidance_scale, noise_level: how it was sampled, so transitions can be re-scored.
    sde_type:       the stochastic step: "sde" (DDIM with eta, or Flow-GRPO's flow SDE), and for
                    flow models "cps" (coefficients-preserving) or "memoryless" (Adjoint Matching)
    sde_window:     (start, end): only steps start <= k < end were stochastic; the others ran the
                    deterministic step (noise level 0, log-prob 0). None: every step.
    means:          [B, T, C, h, w] each step's Gaussian mean at sampling time (``record_means``;
                    GRPO-Guard's ratio normalisation needs it), else None
    """

    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    next_timesteps: Tensor
    cond: Conditioning
    guidance_scale: float
    noise_level: float
    images: Tensor | None = None
    final_latents: Tensor | None = None
    sde_type: str = "sde"
    sde_window: tuple[int, int] | None = None
    means: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def noise_level_at(self, step: int) -> float:
        """The noise level step ``step`` ran with: ``noise_level`` inside the SDE window, else 0."""
        return step_noise_level(self.noise_level, self.sde_window, step)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: Tensor | slice | Sequence[int]) -> "Trajectory":
        """The chains ``index`` of the batch."""
        return dataclasses.replace(
            self,
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            cond=self.cond.select(index),
            images=None if self.images is None else self.images[index],
            final_latents=None if self.final_latents is None else self.final_latents[index],
            means=None if self.means is None else self.means[index],
        )


def step_noise_level(noise_level: float, sde_window: tuple[int, int] | None, step: int) -> float:
    """The noise level of sampler step ``step``: ``noise_level`` inside ``sde_window`` (start
    inclusive, end exclusive; None = every step), 0 (the deterministic step) outside it."""
    if sde_window is None or sde_window[0] <= step < sde_window[1]:
        return noise_level
    return 0.0


@contextlib.contextmanager
def adapter_disabled(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``module`` with every LoRA adapter off (the reference model, no second copy).

    Afterwards each adapter layer gets back its own enabled/disabled state and every parameter
    its ``requires_grad`` flag (peft's enable/disable toggles those), also when the block raises.
    A module without adapters is already the reference and is left untouched.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in layers]
    requires_grad = [(p, p.requires_grad) for p in module.parameters()] if layers else []
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in requires_grad:
            param.requires_grad_(flag)


@contextlib.contextmanager
def adapter_only(module: torch.nn.Module, adapter_name: str) -> Iterator[torch.nn.Module]:
    """Run ``module`` with only the LoRA adapter ``adapter_name`` active (e.g. a frozen copy of
    the LoRA a run continued from, as its reference). Afterwards every adapter layer gets back
    its active adapters and enabled state, and every parameter its ``requires_grad`` flag."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    requires_grad = [(p, p.requires_grad) for p in module.parameters()]
    for layer in layers:
        layer.enable_adapters(True)
        layer.set_adapter(adapter_name)
    try:
        yield module
    finally:
        for layer, active, disabled in before:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for param, flag in requires_grad:
            param.requires_grad_(flag)


def sde_step_kwargs(sde_type: str) -> dict[str, str]:
    """``step``'s keyword for a non-default step type (families with only "sde" need not take it)."""
    return {} if sde_type == "sde" else {"sde_type": sde_type}


class DiffusionPolicy(abc.ABC):
    """What every family shares: guidance, the sampling loop and transition re-scoring.

    Family classes (``SDPolicy``, ``SDXLPolicy``, ``FluxPolicy``) provide the model-specific parts:
    ``encode_prompts``, ``encode_images``, ``decode``, ``noise``, ``target``, ``_denoise``,
    ``schedule``, ``step``, ``training_timesteps`` and ``latent_shape``.
    """

    family: str = ""
    # The frozen adapter that is the reference model (``reference: init``: base + the LoRA the run
    # continued from); None: the base model, i.e. every adapter off.
    reference_adapter: str | None = None
    # The stochastic steps ``step`` implements (``sample(sde_type=...)``); flow families add more.
    sde_types: tuple[str, ...] = ("sde",)

    def __init__(self, pipe, denoiser: torch.nn.Module) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.vae = pipe.vae

    # --- device / dtype ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # The frozen base weights' dtype (LoRA weights may be fp32 over fp16 ones); all of them when
        # the whole denoiser trains (the shapes world's pretraining).
        params = list(self.denoiser.parameters())
        return next((p for p in params if not p.requires_grad), params[0]).dtype

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which ``predict``/``log_prob`` use the reference model: the base model
        (LoRA disabled), or only the frozen ``reference_adapter`` when one is set."""
        if self.reference_adapter is not None:
            return adapter_only(self.denoiser, self.reference_adapter)
        return adapter_disabled(self.denoiser)

    # --- the VAE posterior, for cached latents -----------------------------------------------

    def vae_posterior(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> the VAE encoder's posterior parameters [B, 2C, h, w]
        (mean and log-variance, in the VAE's dtype). ``latents_from_posterior`` turns them into
        exactly the latents ``encode_images`` gives, so a cache of these reproduces training on
        images bit for bit while the VAE never runs again."""
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters

    @abc.abstractmethod
    def latents_from_posterior(self, posterior: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ...

    # --- frozen components off the accelerator --------------------------------------------

    def frozen_components(self) -> list[torch.nn.Module]:
        """The VAE and text encoders: what a run with cached latents and embeddings no longer needs."""
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]

    def offload_frozen(self) -> None:
        """Move the VAE and text encoders to the CPU (``train.offload_frozen``); sample grids and
        evaluations bring them back for their duration (:meth:`frozen_on_device`)."""
        self._offload_device = self.device
        for module in self.frozen_components():
            module.to("cpu")

    @contextlib.contextmanager
    def frozen_on_device(self):
        """The VAE and text encoders on the denoiser's device inside the block (a no-op unless offloaded)."""
        device = getattr(self, "_offload_device", None)
        if device is None or device.type == "cpu":
            yield
            return
        for module in self.frozen_components():
            module.to(device)
        try:
            yield
        finally:
            for module in self.frozen_components():
                module.to("cpu")

    @abc.abstractmethod
    def default_resolution(self) -> int:
        ...

    def with_image_sizes(
        self,
        cond: Conditioning,
        height: int,
        width: int,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        crops_top_left: Sequence[tuple[int, int]] | None = None,
    ) -> Conditioning:
        """``cond`` with per-image size micro-conditioning (SDXL's time ids); other families
        have none and get ``cond`` back. Lets a trainer encode each prompt once and reuse it for
        several images."""
        return cond

    def initial_noise(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        group_size: int = 1,
    ) -> Tensor:
        """Starting latents [batch_size, C, h, w] (fp32); with group_size > 1, each run of
        ``group_size`` consecutive samples shares one noise draw."""
        if batch_size % group_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of group_size {group_size}")
        shape = (batch_size // group_size, *self.latent_shape(height, width))
        noise_device = generator.device if generator is not None else self.device
        noise = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32)
        return noise.to(self.device).repeat_interleave(group_size, dim=0)

    # --- prediction -------------------------------------------------------------------------

    def predict(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Conditioning,
        guidance_scale: float | None = None,
        checkpoint: bool = False,
    ) -> Tensor:
        """Denoiser output at (x_t, t) in fp32, [B, C, h, w].

        With ``guidance_scale`` (> 1, or any value != 1 such as the negative guidance of
        Self-NPO) and ``cond.uncond`` present, returns classifier-free guidance
        ``uncond + s * (cond - uncond)``, both branches in one batched call.
        ``checkpoint`` recomputes the denoiser activations in backward (saves memory).
        """
        t = torch.as_tensor(t, device=x_t.device).float()
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        use_cfg = guidance_scale is not None and guidance_scale != 1.0 and cond.uncond is not None
        if use_cfg:
            x_in = torch.cat([x_t, x_t])
            t_in = torch.cat([t, t])
            cond_in = Conditioning.cat([cond.uncond, cond])
        else:
            x_in, t_in, cond_in = x_t, t, cond
        if checkpoint and torch.is_grad_enabled():
            out = _checkpoint(self._denoise, x_in, t_in, cond_in, use_reentrant=False)
        else:
            out = self._denoise(x_in, t_in, cond_in)
        out = out.float()
        if use_cfg:
            uncond_out, cond_out = out.chunk(2)
            return uncond_out + guidance_scale * (cond_out - uncond_out)
        return out

    @abc.abstractmethod
    def _denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        ...

    # --- sampling with log-probabilities ------------------------------------------------------

    def sample(
        self,
        cond: Conditioning,
        num_steps: int,
        guidance_scale: float = 1.0,
        noise_level: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        grad_steps: int = 0,
        checkpoint: bool = False,
        decode: bool = True,
        sde_type: str = "sde",
        sde_window: tuple[int, int] | None = None,
        schedule_shift: float | None = None,
        record_means: bool = False,
    ) -> Trajectory:
        """Sample ``len(cond)`` chains with ``num_steps`` steps, recording every transition.

        noise_level: DDIM eta for SD/SDXL; the flow SDE's ``a`` for FLUX (0 = deterministic).
        sde_type: one of the family's ``sde_types`` ("sde"; flow models also "cps", "memoryless").
        sde_window: (start, end): steps outside it run deterministically (the ODE / DDIM eta 0;
            Flow-GRPO-Fast's and MixGRPO's SDE window). None: every step uses ``noise_level``.
        schedule_shift: see :meth:`sampling_schedule`. record_means: keep each step's mean.
        latents: starting noise [B, C, h, w] (e.g. from ``initial_noise(group_size=G)``).
        grad_steps: gradients flow through the last ``grad_steps`` steps (-1: all; 0: none);
            earlier steps run under no_grad. ``checkpoint`` checkpoints each denoiser call.
        """
        if sde_type not in self.sde_types:
            raise ValueError(f"sde_type {sde_type!r} is not available for the {self.family} family; "
                             f"it has {', '.join(self.sde_types)}")
        height = height or self.default_resolution()
        width = width or self.default_resolution()
        batch = len(cond)
        if latents is None:
            latents = self.initial_noise(batch, height, width, generator)
        timesteps, next_timesteps = self.sampling_schedule(num_steps, height, width, schedule_shift)
        first_grad_step = 0 if grad_steps < 0 else num_steps - grad_steps
        x = latents.float()
        chain, log_probs, means = [x.detach()], [], []
        for i in range(num_steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_grad_step):
                model_out = self.predict(x, timesteps[i], cond, guidance_scale, checkpoint=checkpoint)
                x, log_prob, mean, _ = self.step(
                    model_out, x, timesteps[i], next_timesteps[i], step_noise_level(noise_level, sde_window, i),
                    timesteps=timesteps, generator=generator, **sde_step_kwargs(sde_type),
                )
            chain.append(x.detach())
            log_probs.append(log_prob.detach())
            if record_means:
                means.append(mean.detach())
        images = None
        if decode:
            with torch.set_grad_enabled(torch.is_grad_enabled() and grad_steps != 0):
                images = self.decode(x)
        return Trajectory(
            latents=torch.stack(chain, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=timesteps,
            next_timesteps=next_timesteps,
            cond=cond,
            guidance_scale=guidance_scale,
            noise_level=noise_level,
            images=images,
            final_latents=x,
            sde_type=sde_type,
            sde_window=sde_window,
            means=torch.stack(means, dim=1) if record_means else None,
        )

    def sampling_schedule(
        self, num_steps: int, height: int, width: int, shift: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """The family's schedule (:meth:`schedule`), or for flow models with ``shift`` the static
        shift of Pref-GRPO and SD3 (``sigma = shift s / (1 + (shift - 1) s)`` on s = linspace(1, 0,
        T + 1), whatever the resolution): model timesteps [T] and where each step lands [T]."""
        if shift is None:
            return self.schedule(num_steps, height, width)
        if getattr(self, "prediction_type", None) != "flow":
            raise ValueError(f"a static schedule shift needs a flow-matching model; the {self.family} family is not one")
        sigmas = flow_static_shift_sigmas(num_steps, shift).to(self.device)
        return sigmas[:-1] * 1000.0, sigmas[1:] * 1000.0

    def step_distribution(
        self, trajectory: Trajectory, step: int | Tensor, checkpoint: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Re-score transition ``step`` of a recorded trajectory under the current weights.

        ``step``: one step index for the whole batch, or a [B] tensor of one index per chain (all
        with the same noise level, e.g. inside the SDE window). Returns (log_prob [B], mean, std)
        of latents[:, step+1] given latents[:, step], with the guidance, noise level and step
        type used at sampling time. Gradients flow to the adapter.
        """
        if isinstance(step, Tensor) and step.ndim == 1:
            index = step.to(trajectory.latents.device)
            rows = torch.arange(len(index), device=index.device)
            x_t, x_next = trajectory.latents[rows, index], trajectory.latents[rows, index + 1]
            t, t_next = trajectory.timesteps[index], trajectory.next_timesteps[index]
            levels = {trajectory.noise_level_at(k) for k in index.tolist()}
            if len(levels) > 1:
                raise ValueError("step_distribution: per-chain steps must share one noise level (all inside the SDE window)")
            noise_level = levels.pop()
        else:
            step = int(step)
            x_t, x_next = trajectory.latents[:, step], trajectory.latents[:, step + 1]
            t, t_next = trajectory.timesteps[step], trajectory.next_timesteps[step]
            noise_level = trajectory.noise_level_at(step)
        model_out = self.predict(x_t, t, trajectory.cond, trajectory.guidance_scale, checkpoint=checkpoint)
        _, log_prob, mean, std = self.step(
            model_out, x_t, t, t_next, noise_level, timesteps=trajectory.timesteps, prev_sample=x_next,
            **sde_step_kwargs(trajectory.sde_type),
        )
        return log_prob, mean, std

    def log_prob(self, trajectory: Trajectory, step: int, checkpoint: bool = False) -> Tensor:
        """Log-probability [B] of recorded transition ``step`` under the current weights."""
        return self.step_distribution(trajectory, step, checkpoint)[0]

    # --- family-specific ------------------------------------------------------------------------

    @abc.abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        ...

    @abc.abstractmethod
    def schedule(self, num_steps: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        ...

    @abc.abstractmethod
    def step(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        t_next: Tensor,
        noise_level: float,
        timesteps: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One sampler step with its log-prob: (prev_sample, log_prob [B], mean, std). A family
        whose ``sde_types`` lists more than "sde" also takes ``sde_type=`` (passed only when it is
        not "sde")."""
