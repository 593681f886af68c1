"""Sampler step maths with log-probabilities: pure functions, computed in fp32.

Two processes cover the supported families:

* **DDPM-type** (SD1.x/2.x, SDXL; epsilon or v-prediction): the DDIM step of Song et al. with
  stochasticity ``eta`` (eta=1 is the DDPM ancestral step, the one D3PO and DDPO use).
* **Flow matching** (FLUX.1; ``x_sigma = (1 - sigma) x0 + sigma noise``, velocity = noise - x0):
  the deterministic Euler ODE step, Flow-GRPO's SDE step, whose marginals match the ODE's,
  with ``std(sigma) = a * sqrt(sigma / (1 - sigma))`` (with ``a = sqrt(2)`` the memoryless
  schedule of Adjoint Matching), and the coefficients-preserving step (CPS).

Every ``*_with_logprob`` function returns ``(prev_sample, log_prob, mean, std)``. The
log-probability is that of ``prev_sample`` under the step's Gaussian ``N(mean, std^2)``, taken as
the **mean over C, H, W** of the per-element log-density (so its scale does not depend on the
image size). A transition with ``std == 0`` is deterministic: its log-probability is reported as 0.

Passing ``prev_sample`` recomputes the log-probability of a recorded transition (for importance
ratios against the sampling-time policy or the reference); otherwise the next sample is drawn with
``generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dims of log N(x; mean, std^2).

    x, mean: [B, ...]; std: broadcastable to x with std > 0. Returns [B] (fp32).
    """
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or a [B] tensor to [B, 1, 1, ...] matching ``like``, in fp32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def _sample_or_score(
    mean: Tensor, std: Tensor, prev_sample: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw ``N(mean, std^2)`` (or take the recorded ``prev_sample``) and its log-probability."""
    std_full = std.expand_as(mean) if std.ndim else std.expand(mean.shape)
    if prev_sample is None:
        # Draw on the generator's own device (a CPU generator may drive a CUDA run), then move.
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        prev_sample = mean + std_full * noise.to(mean.device)
    prev_sample = prev_sample.float()
    deterministic = std_full.flatten(1).amax(dim=1) == 0
    safe_std = torch.where(std_full > 0, std_full, torch.ones_like(std_full))
    log_prob = gaussian_log_prob(prev_sample, mean, safe_std)
    log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
    return prev_sample, log_prob


# --- DDPM-type models: DDIM with eta ---------------------------------------------------------


def predicted_x0_and_eps(
    model_output: Tensor, sample: Tensor, alpha_prod_t: Tensor | float, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Recover (x0, epsilon) from a denoiser output at cumulative alpha ``alpha_prod_t``.

    ``prediction_type`` is "epsilon" or "v_prediction" (v = sqrt(a) eps - sqrt(1-a) x0).
    """
    model_output, sample = model_output.float(), sample.float()
    a = _per_sample(alpha_prod_t, sample)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return x0, eps


def ddim_step_with_logprob(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor | float,
    alpha_prod_prev: Tensor | float,
    eta: float,
    prediction_type: str = "epsilon",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12) with its log-probability.

    alpha_prod_t / alpha_prod_prev: cumulative alphas at t and at the previous timestep (for the
    step past the last timestep, the scheduler's ``final_alpha_cumprod``), scalars or [B].
    eta: 0 = deterministic DDIM, 1 = DDPM posterior variance.
    Returns (prev_sample [B,C,H,W] fp32, log_prob [B], mean, std [B,1,1,1] or scalar).
    """
    a_t = _per_sample(alpha_prod_t, sample)
    a_prev = _per_sample(alpha_prod_prev, sample)
    x0, eps = predicted_x0_and_eps(model_output, sample, a_t, prediction_type)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    mean = a_prev.sqrt() * x0 + direction
    prev_sample, log_prob = _sample_or_score(mean, std, prev_sample, generator)
    return prev_sample, log_prob, mean, std


# --- flow matching ---------------------------------------------------------------------------


def flow_ode_step(velocity: Tensor, sample: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Deterministic Euler step of the flow ODE: x_{next} = x + (sigma_next - sigma) * v (fp32)."""
    dt = _per_sample(sigma_next, sample) - _per_sample(sigma, sample)
    return sample.float() + dt * velocity.float()


def flow_sde_std(
    sigma: Tensor | float, noise_level: float, sigma_max: Tensor | float, memoryless_cap: bool = False
) -> Tensor:
    """Diffusion coefficient g = a * sqrt(sigma / (1 - sigma)) of Flow-GRPO's SDE.

    At sigma = 1 the expression diverges. By default only the denominator is guarded, as the
    reference code does (Flow-GRPO ``sd3_sde_with_logprob.py`` and Pref-GRPO ``grpo/steps.py``:
    ``sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma)))``), so the first step of a schedule
    that starts at sigma = 1 has ``g = a / sqrt(1 - sigma_max)``. ``sigma_max`` (< 1) is the
    schedule's second sigma, as in the reference.

    ``memoryless_cap`` caps sigma at ``sigma_max`` in the numerator too (``g = a sqrt(sigma_max /
    (1 - sigma_max))``). Adjoint Matching keeps that form: with its memoryless ``a = sqrt(2)`` and
    the exact velocity at sigma = 1 (``v = x - E[x0]``), the capped first step has mean
    ``(1 - sigma_max) E[x0]``, independent of the starting noise (the memoryless property its lean
    adjoint relies on), whereas the reference guard gives ``-(1 - sigma_max)(x - E[x0])``.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    cap = torch.as_tensor(sigma_max, dtype=torch.float32, device=sigma.device)
    if memoryless_cap:
        capped = torch.minimum(sigma, cap)
        return noise_level * (capped / (1 - capped)).sqrt()
    denominator = 1 - torch.where(sigma >= 1, cap, sigma)
    return noise_level * (sigma / denominator).sqrt()


def flow_sde_step_with_logprob(
    velocity: Tensor,
    sample: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    sigma_max: Tensor | float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    memoryless_cap: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Euler-Maruyama step of the marginal-preserving flow SDE (Flow-GRPO, Liu et al. 2025).

    With g = flow_sde_std(sigma) and dt = sigma_next - sigma < 0:
        mean = x + [v + g^2 / (2 sigma) * (x + (1 - sigma) v)] dt,   std = g * sqrt(-dt)
    (x + (1 - sigma) v is the model's noise estimate, so the bracket adds the score correction.)
    noise_level = 0 gives the ODE step. ``memoryless_cap``: see :func:`flow_sde_std`.
    Returns (prev_sample, log_prob [B], mean, std).
    """
    x, v = sample.float(), velocity.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    dt = s_next - s
    g = _per_sample(flow_sde_std(sigma, noise_level, sigma_max, memoryless_cap).to(x.device), x)
    mean = x + (v + g**2 / (2 * s) * (x + (1 - s) * v)) * dt
    std = g * (-dt).clamp(min=0).sqrt()
    prev_sample, log_prob = _sample_or_score(mean, std, prev_sample, generator)
    return prev_sample, log_prob, mean, std


def flow_cps_step_with_logprob(
    velocity: Tensor,
    sample: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One coefficients-preserving sampling step (CPS; Wang et al. 2025, "Coefficients-Preserving
    Sampling for Reinforcement Learning with Flow Matching"; Flow-GRPO ``sde_type="cps"``).

    With the model's estimates x0 = x - sigma v and eps = x + (1 - sigma) v:
        std  = sigma_next * sin(a * pi / 2)
        mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) eps
    so a sample keeps exactly the forward process's coefficients, (1 - sigma_next) on x0 and a
    total noise variance sigma_next^2. a = 0 gives the Euler ODE step; the last step (sigma_next =
    0) is deterministic. The log-probability is the Gaussian one of every step here (mean over
    C, H, W); the reference keeps only ``-mean((x - mean)^2)``, which scales the log-ratio by
    2 std^2 (GRPO's ``cps_log_prob: flow_grpo``). Returns (prev_sample, log_prob [B], mean, std).
    """
    x, v = sample.float(), velocity.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0 = x - s * v
    eps = x + (1 - s) * v
    mean = (1 - s_next) * x0 + (s_next**2 - std**2).clamp(min=0).sqrt() * eps
    prev_sample, log_prob = _sample_or_score(mean, std, prev_sample, generator)
    return prev_sample, log_prob, mean, std


def flow_static_shift_sigmas(num_steps: int, shift: float) -> Tensor:
    """Sigmas [T + 1] of a static-shift flow schedule (SD3's scheduler shift; Pref-GRPO
    ``sd3_time_shift``): ``shift * s / (1 + (shift - 1) * s)`` on ``s = linspace(1, 0, T + 1)``.
    Starts at 1, ends at 0; ``shift = 1`` is the plain linear schedule."""
    if shift <= 0:
        raise ValueError(f"schedule shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
    return shift * s / (1 + (shift - 1) * s)


def memoryless_flow_noise_level() -> float:
    """The ``a`` that makes the flow SDE memoryless (Adjoint Matching: sigma(t)^2 = 2(1-t)/t)."""
    return math.sqrt(2.0)
