"""Adjoint Matching maths (Domingo-Enrich et al. 2024, arXiv 2409.08861): memoryless schedules
and the lean adjoint, solved backwards by vector-Jacobian products through the *base* sampler.

Time convention of the paper: ``t`` runs from 0 (noise) to 1 (data). A policy's sampler step maps
``x_k`` (model timestep ``timesteps[k]``) to ``x_{k+1} ~ N(mean_k(x_k), std_k^2)``. We read every
step as one Euler-Maruyama step of the SDE ``dX = b(X, t) dt + sigma(t) dB`` over a time step

    dt_k = (timesteps[k] - next_timesteps[k]) / 1000          (so t = 1 - timestep / 1000)

which is exact for flow models (t = 1 - sigma) and a uniform clock for DDPM timesteps. Then

    drift      b_k(x)   = (mean_k(x) - x) / dt_k
    diffusion  sigma_k  = std_k / sqrt(dt_k)

**Memoryless noise.** Flow models: the Flow-GRPO SDE with ``a = sqrt(2)``
(``samplers.memoryless_flow_noise_level``) has ``g^2 = 2 sigma / (1 - sigma)``, i.e. the paper's
``sigma(t)^2 = 2 (1 - t) / t``; its drift is ``2 v - x / t`` (v the data-ward velocity).
``sigma(t)`` diverges at t -> 0 (pure noise); the policies cap it at the schedule's second sigma
and :func:`memoryless_flow_sigma` clamps ``t >= t_min``. SD/SDXL: DDIM with eta = 1 (the DDPM
ancestral sampler), whose initial noise is independent of the final sample.

**Lean adjoint.** ``d a / dt = -(grad_x b(X_t, t))^T a``, ``a(1) = -lambda grad r(X_1)``, with b the
base drift (LoRA disabled). The Euler discretisation backwards is
``a_k = a_{k+1} + dt_k (grad b_k)^T a_{k+1} = (grad_x mean_k(x_k))^T a_{k+1}``: the exact adjoint of
the discrete chain, one VJP of the base step mean per step, independent of how time is labelled.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .base import DiffusionPolicy, Trajectory, sde_step_kwargs

# One step mean of the base sampler: (step index k, x_k [B, C, h, w]) -> mean_k(x_k) [B, C, h, w].
StepMean = Callable[[int, Tensor], Tensor]


def memoryless_noise_level(family: str) -> float:
    """The sampler ``noise_level`` that makes a family's SDE memoryless: sqrt(2) for flow models
    (the flow SDE's ``a``), 1.0 for SD/SDXL (DDIM eta = 1)."""
    if family in ("flux", "sd3"):
        return math.sqrt(2.0)
    if family in ("sd", "sdxl"):
        return 1.0
    raise ValueError(f"unknown model family {family!r}; expected 'sd', 'sdxl', 'flux' or 'sd3'")


def memoryless_sde_type(family: str) -> str:
    """The sampler ``sde_type`` of the memoryless schedule: "memoryless" for flow models (the flow
    SDE with sigma = 1 capped in numerator and denominator, which makes the first step's mean
    independent of the starting noise; see ``samplers.flow_sde_std``), "sde" (DDIM) for SD/SDXL."""
    memoryless_noise_level(family)  # the same families, the same error for others
    return "sde" if family in ("sd", "sdxl") else "memoryless"


def memoryless_flow_sigma(t: Tensor | float, t_min: float = 1e-3) -> Tensor:
    """Memoryless diffusion coefficient of a rectified flow, sigma(t) = sqrt(2 (1 - t) / t).

    t: paper time in [0, 1] (1 = data), any shape. It diverges at t = 0, so t is clamped to
    ``[t_min, 1]`` first. Returns fp32 of t's shape, >= 0 (0 at t = 1).
    """
    t = torch.as_tensor(t, dtype=torch.float32).clamp(min=t_min, max=1.0)
    return (2.0 * (1.0 - t) / t).sqrt()


def step_dt(timesteps: Tensor, next_timesteps: Tensor) -> Tensor:
    """Paper time step ``dt_k = (timesteps[k] - next_timesteps[k]) / 1000`` of each sampler step, [T] fp32 > 0."""
    return (timesteps.float() - next_timesteps.float()) / 1000.0


def solve_lean_adjoint(step_mean: StepMean, latents: Tensor, terminal_adjoint: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the lean adjoint backwards along a recorded chain by vector-Jacobian products.

    a_T = terminal_adjoint;  a_k = (d mean_k / d x)(x_k)^T a_{k+1}  for k = T-1 ... 0.

    step_mean: the base sampler's step mean (see module docstring); it is called once per step
        with grad enabled on a detached copy of x_k, and must not need gradients elsewhere.
    latents: [B, T+1, C, h, w] the chain x_0 (noise) ... x_T (sample), fp32.
    terminal_adjoint: [B, C, h, w], usually -lambda * grad r(x_T).
    Returns (adjoints [B, T+1, C, h, w] with adjoints[:, T] = terminal_adjoint,
    base_means [B, T, C, h, w] = mean_k(x_k)), both detached fp32.
    """
    num_steps = latents.shape[1] - 1
    adjoints = torch.empty_like(latents, dtype=torch.float32)
    base_means = torch.empty_like(latents[:, :-1], dtype=torch.float32)
    a = terminal_adjoint.detach().float()
    adjoints[:, num_steps] = a
    for k in range(num_steps - 1, -1, -1):
        x_k = latents[:, k].detach().float().requires_grad_(True)
        with torch.enable_grad():
            mean = step_mean(k, x_k).float()
            (a,) = torch.autograd.grad(mean, x_k, grad_outputs=a)
        adjoints[:, k] = a
        base_means[:, k] = mean.detach()
    return adjoints, base_means


def base_step_mean(policy: DiffusionPolicy, trajectory: Trajectory, checkpoint: bool = False) -> StepMean:
    """The step mean of the policy's denoiser for the chain ``trajectory`` (the same conditioning,
    guidance scale, noise level and schedule it was sampled with). Call it inside
    ``policy.reference()`` for the *base* model, as :func:`lean_adjoint` does."""

    def step_mean(k: int, x_k: Tensor) -> Tensor:
        t, t_next = trajectory.timesteps[k], trajectory.next_timesteps[k]
        model_out = policy.predict(x_k, t, trajectory.cond, trajectory.guidance_scale, checkpoint=checkpoint)
        _, _, mean, _ = policy.step(
            model_out, x_k, t, t_next, trajectory.noise_level_at(k),
            timesteps=trajectory.timesteps, prev_sample=trajectory.latents[:, k + 1],
            **sde_step_kwargs(trajectory.sde_type),
        )
        return mean

    return step_mean


def lean_adjoint(
    policy: DiffusionPolicy, trajectory: Trajectory, terminal_adjoint: Tensor, checkpoint: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`solve_lean_adjoint` through ``policy``'s base model along ``trajectory``.

    Returns (adjoints [B, T+1, C, h, w], base_means [B, T, C, h, w]), detached fp32.
    """
    # The whole solve, backward passes included, runs with the LoRA off: gradient checkpointing
    # recomputes activations during backward and must see the same (base) model as the forward.
    with policy.reference():
        return solve_lean_adjoint(base_step_mean(policy, trajectory, checkpoint), trajectory.latents, terminal_adjoint)
