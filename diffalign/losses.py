"""Training objectives: one pure function per objective, tensors in, ``(loss, metrics)`` out.

Every function documents the equation it implements and the shapes it takes. Metrics are
detached scalars (floats, or 0-d tensors where converting early would force a device sync);
``float()`` them after backward. Per-sample MSE means the mean over C, H, W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every non-batch dim: [B, ...] x [B, ...] -> [B] (fp32)."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


# --- Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) ------------------------------------


def diffusion_dpo_loss(
    policy_err_w: Tensor,
    policy_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss (paper eq. 14, with the 1/2 of the Gaussian log-likelihood).

    All inputs are per-sample denoising errors [B] (MSE of prediction vs target) of the winner
    (w) and loser (l), computed with shared noise and timestep for the pair:

        inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
        loss   = -log sigmoid(inside), averaged over the batch

    A policy that lowers the winner's error more than the reference does has inside > 0 and
    loss < log 2. Metrics: implicit accuracy = mean(inside > 0), the reward margin (mean inside),
    and the policy/reference error gaps.
    """
    model_diff = policy_err_w - policy_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    # Detached 0-d tensors, not floats: converting here would force a device sync before backward.
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": (inside > 0).float().mean(),
        "reward_margin": inside.detach().mean(),
        "policy_err_gap": model_diff.detach().mean(),
        "ref_err_gap": ref_diff.detach().mean(),
        "policy_err_w": policy_err_w.detach().mean(),
        "policy_err_l": policy_err_l.detach().mean(),
    }
    return loss, metrics


def sft_loss(policy_err_w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised fine-tuning on the winners: the plain denoising loss mean(err_w)."""
    loss = policy_err_w.mean()
    return loss, {"loss": loss.detach(), "policy_err_w": loss.detach()}


# --- D3PO and GRPO: objectives on per-step sampler log-probabilities ---------------------------
# Log-probabilities here are those of ``diffalign.pipelines.samplers``: per-sample means over
# C, H, W of the Gaussian log-density of one recorded sampler transition, shape [B].


def d3po_loss(
    policy_logp_w: Tensor,
    policy_logp_l: Tensor,
    ref_logp_w: Tensor,
    ref_logp_l: Tensor,
    beta: float = 0.1,
    eps: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """D3PO loss (Yang et al. 2023, arXiv 2311.13231): DPO on one denoising step of a pair.

    Inputs are log-probabilities [B] of the same step of the winner (w) and loser (l) chains,
    under the policy and under the reference (LoRA off). With the ratio clamped hard, as in the
    paper's reference code (no gradient once a ratio leaves the band):

        r_w    = clamp(exp(policy_logp_w - ref_logp_w), 1 - eps, 1 + eps)      (same for r_l)
        inside = beta * (log r_w - log r_l)
        loss   = -log sigmoid(inside), averaged over the batch

    ``log(clamp(exp(x)))`` is evaluated as ``clamp(x, log(1-eps), log(1+eps))`` (same values and
    gradients, no overflow). At the reference (policy == ref) the loss is log 2.
    Metrics (detached 0-d tensors): implicit accuracy = mean(unclamped log-ratio of w > that of
    l), the fraction of ratios clamped, and the mean log-ratios.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    log_ratio_w = policy_logp_w.float() - ref_logp_w.float()
    log_ratio_l = policy_logp_l.float() - ref_logp_l.float()
    low, high = torch.log1p(torch.tensor([-eps, eps], dtype=torch.float64)).tolist()
    inside = beta * (log_ratio_w.clamp(low, high) - log_ratio_l.clamp(low, high))
    loss = -F.logsigmoid(inside).mean()
    both = torch.cat([log_ratio_w, log_ratio_l]).detach()
    # Detached 0-d tensors (no device sync before backward), as for Diffusion-DPO.
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": (log_ratio_w > log_ratio_l).float().mean(),
        "clip_frac": ((both < low) | (both > high)).float().mean(),
        "log_ratio_w": log_ratio_w.detach().mean(),
        "log_ratio_l": log_ratio_l.detach().mean(),
    }
    return loss, metrics


def gaussian_mean_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor | float, dt: Tensor | float | None = None) -> Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per element, averaged over C, H, W -> [B].

    Both step distributions share ``std`` (it depends on the schedule, not on the weights), so
    the KL is ``(mean_p - mean_q)^2 / (2 std^2)``. Elements with std == 0 (a deterministic step)
    contribute 0. mean_p, mean_q: [B, C, H, W]; std: scalar, [B, 1, 1, 1] or full shape.

    ``dt`` (scalar or [B], > 0): Flow-GRPO's form (``kl_form: flow_grpo``; ``train_sd3.py``
    divides by the squared diffusion coefficient g^2 = std^2 / dt, not by std^2), i.e. this KL
    times dt. The paper's form (Flow-GRPO eq. 7's per-step KL) is ``dt = None``.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_p.device).expand_as(mean_p)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * safe**2)
    kl = torch.where(std > 0, kl, torch.zeros_like(kl))
    kl = kl.mean(dim=tuple(range(1, kl.ndim)))
    if dt is not None:
        kl = kl * torch.as_tensor(dt, dtype=torch.float32, device=kl.device)
    return kl


def ratio_normalised_log_ratio(
    log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor | float
) -> Tensor:
    """GRPO-Guard's ratio normalisation (Wang et al. 2025, arXiv 2510.22319; as Pref-GRPO
    ``train_flux.py --rationorm`` computes it): the log-ratio of one step, de-biased and rescaled,

        log r = std * (log_prob - old_log_prob + mean_CHW((mean - old_mean)^2) / (2 std^2))

    With ``x = old_mean + std * z`` recorded at sampling time this is ``mean_CHW(z * (mean -
    old_mean))``: zero in expectation at every step, whereas the plain log-ratio carries the
    ``-(mean - old_mean)^2 / (2 std^2)`` drift that pulls the ratio below 1 where std is small.
    log_prob, old_log_prob: [B]; mean, old_mean: [B, C, H, W]; std: scalar or [B, 1, 1, 1] > 0.
    Returns [B].
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    std_b = std.flatten(1)[:, 0] if std.ndim > 1 else std  # one std per sample: [B] (or a scalar)
    bias = ((mean.float() - old_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std_b**2)
    return std_b * (log_prob.float() - old_log_prob.float() + bias)


def squared_error_log_ratio(log_prob: Tensor, old_log_prob: Tensor, std: Tensor | float) -> Tensor:
    """Flow-GRPO's CPS log-ratio (``sd3_sde_with_logprob.py``, ``sde_type="cps"``: its log-prob keeps
    only ``-mean_CHW((x - mean)^2)``), from Gaussian log-probs of the same step:

        log r = 2 std^2 (log_prob - old_log_prob) = mean((x - old_mean)^2) - mean((x - mean)^2)

    (the Gaussian log-probs share std, so their difference is the squared errors' over 2 std^2).
    log_prob, old_log_prob: [B]; std: scalar or [B, 1, 1, 1]. Returns [B].
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=log_prob.device)
    std_b = std.flatten(1)[:, 0] if std.ndim > 1 else std
    return 2 * std_b**2 * (log_prob.float() - old_log_prob.float())


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
    log_ratio: Tensor | None = None,
    policy_weight: Tensor | float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO clipped-ratio policy loss for one sampler step (Flow-GRPO, Liu et al. 2025,
    arXiv 2505.05470; the PPO-clip surrogate with group-relative advantages).

    log_prob: [B] under the current weights; old_log_prob: [B] recorded at sampling time;
    advantages: [B] (already normalised and clipped); kl: optional [B] KL to the reference
    (:func:`gaussian_mean_kl`), weighted by ``kl_beta``:

        ratio  = exp(log_prob - old_log_prob)           (or exp(log_ratio) when given)
        policy = mean(w * max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)))
        loss   = policy + kl_beta * mean(kl)

    ``log_ratio``: a replacement log-ratio [B] (:func:`ratio_normalised_log_ratio`,
    :func:`squared_error_log_ratio`);
    ``policy_weight`` w: scalar or [B] (GRPO-Guard weighs each step by 1 / |dt|).
    Metrics (detached 0-d tensors): clip_frac = mean(|ratio - 1| > clip_range), approx_kl =
    0.5 * mean((log_prob - old_log_prob)^2) (to the sampling policy), the ratio's mean, and the
    KL to the reference when given.
    """
    raw_log_ratio = log_prob.float() - old_log_prob.float()
    log_ratio = raw_log_ratio if log_ratio is None else log_ratio.float()
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = (torch.as_tensor(policy_weight, dtype=torch.float32, device=ratio.device)
                   * torch.maximum(unclipped, clipped)).mean()
    loss = policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "clip_frac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * (raw_log_ratio.detach() ** 2).mean(),
        "ratio": ratio.detach().mean(),
    }
    if kl is not None:
        kl_mean = kl.float().mean()
        loss = policy_loss + kl_beta * kl_mean
        metrics["kl_ref"] = kl_mean.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


# --- Reward-gradient methods: DRaFT and Adjoint Matching -----------------------------------------


def draft_loss(rewards: Tensor, reward_scale: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """DRaFT loss (Clark et al. 2023, arXiv 2309.17400, eq. 2): maximise the reward by gradient
    descent on its negative, ``loss = -reward_scale * mean(r)``.

    rewards: [B] differentiable rewards of the decoded samples, or [B, n] for DRaFT-LV (n re-noised
    copies of each sample, averaged first: the paper's lower-variance estimate, sec. 4.2).
    Metrics (detached 0-d tensors): loss, the mean reward and its standard deviation over the B samples.
    """
    per_sample = rewards.float().mean(dim=1) if rewards.ndim == 2 else rewards.float()
    loss = -reward_scale * per_sample.mean()
    detached = per_sample.detach()
    metrics = {
        "loss": loss.detach(),
        "reward": detached.mean(),
        "reward_std": detached.std() if detached.numel() > 1 else torch.zeros((), device=detached.device),
    }
    return loss, metrics


def adjoint_matching_loss(
    fine_mean: Tensor,
    base_mean: Tensor,
    std: Tensor | float,
    adjoint: Tensor,
    loss_clip: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Adjoint Matching loss of one sampler step (Domingo-Enrich et al. 2024, arXiv 2409.08861,
    eq. 28 / Algorithm 1), in its discretised form.

    One step x -> N(mean, std^2) over a time step dt is an Euler-Maruyama step with drift
    b = (mean - x) / dt and diffusion sigma = std / sqrt(dt). The control is the scaled drift
    difference u = (b_fine - b_base) / sigma, and the paper's regression ||u + sigma a||^2 weighted
    by dt (the Riemann sum of the time integral, as the authors' code does) is

        dt * ||u + sigma a||^2 = || (fine_mean - base_mean) / std + std * a ||^2

    summed over C, H, W: no time parametrisation left, so one formula serves DDIM and flows.

    fine_mean: [B, C, H, W] step mean under the fine-tuned model (carries the gradient).
    base_mean: [B, C, H, W] step mean under the base model (LoRA disabled), no gradient.
    std: the step's noise std, scalar or [B, 1, 1, 1], > 0.
    adjoint: [B, C, H, W] lean adjoint a at the step's landing point (see the trainer).
    loss_clip: per-sample clipping; a term above it is replaced by the constant ``loss_clip``
        (no gradient), so rare outlier samples do not dominate the update.
    Returns the batch mean of the per-sample terms. Metrics (detached 0-d tensors): loss,
    control_norm (mean of ||(fine_mean - base_mean)/std||^2), target_norm (mean of ||std a||^2), clip_frac.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=fine_mean.device)
    if not bool((std > 0).all()):
        raise ValueError("adjoint_matching_loss needs std > 0 (a deterministic step has no control cost)")
    sum_dims = tuple(range(1, fine_mean.ndim))
    control = (fine_mean.float() - base_mean.float()) / std
    target = std * adjoint.float()
    per_sample = ((control + target) ** 2).sum(dim=sum_dims)
    clipped = per_sample if loss_clip is None else per_sample.clamp(max=loss_clip)
    loss = clipped.mean()
    metrics = {
        "loss": loss.detach(),
        "control_norm": (control.detach() ** 2).sum(dim=sum_dims).mean(),
        "target_norm": (target.detach() ** 2).sum(dim=sum_dims).mean(),
        "clip_frac": (per_sample.detach() > (float("inf") if loss_clip is None else loss_clip)).float().mean(),
    }
    return loss, metrics


# --- Self-NPO (Wang et al. 2025, arXiv 2505.11777): truncated diffusion fine-tuning -------------


def pseudo_huber(prediction: Tensor, target: Tensor, c: float = 0.001) -> Tensor:
    """Per-sample pseudo-Huber distance [B]: mean over C, H, W of sqrt((p - q)^2 + c^2) - c.

    Elementwise, as in the Self-NPO reference code (the metric of Song & Dhariwal's improved
    consistency training): about (p - q)^2 / (2c) for |p - q| << c, and |p - q| - c beyond.
    prediction, target: [B, ...]; c > 0. Computed in fp32.
    """
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    diff = prediction.float() - target.float()
    return ((diff**2 + c**2).sqrt() - c).mean(dim=tuple(range(1, diff.ndim)))


def self_npo_loss(
    student_x0: Tensor, teacher_x0: Tensor, huber_c: float = 0.001
) -> tuple[Tensor, dict[str, float]]:
    """Self-NPO objective: the student's clean-image prediction regresses onto the teacher's.

    The teacher (EMA negative model) ran a few deterministic DDIM steps with negative guidance
    ``cond + w (cond - uncond)`` from a noised sample and predicted x0 where it stopped; that
    point was re-noised to a strictly higher timestep, where the student (the LoRA being trained,
    conditioned on the prompt) predicts ``student_x0``:

        loss = mean_b pseudo_huber(student_x0_b, stopgrad(teacher_x0_b), c)

    student_x0, teacher_x0: [B, C, h, w] latents (teacher detached here). Metrics: loss and the
    plain per-element MSE between the two predictions.
    """
    teacher_x0 = teacher_x0.detach()
    loss = pseudo_huber(student_x0, teacher_x0, huber_c).mean()
    mse = per_sample_mse(student_x0.detach(), teacher_x0).mean()
    return loss, {"loss": loss.item(), "x0_mse": mse.item()}


# --- DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117; reference NVlabs/DiffusionNFT) ------------


def nft_optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] from advantages [B]:

        r = clip(clip(A, -m, m) / m / 2 + 1/2, 0, 1),   m = adv_clip_max

    (A = 0 -> r = 1/2: the positive and negative terms weigh the same; A >= m -> r = 1.)
    """
    clipped = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def diffusion_nft_loss(
    x0_theta: Tensor,
    x0_old: Tensor,
    x0: Tensor,
    advantages: Tensor,
    beta: float,
    adv_clip_max: float,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's negative-aware fine-tuning loss at one training timestep (paper eq. 9 with
    the reference's adaptive weighting and scaling).

    x0_theta, x0_old: [B, C, h, w] clean-latent predictions of the trained and the old (sampling)
    model at the same x_t; x0: [B, C, h, w] the sampled clean latents; advantages: [B]. For a flow
    model x0_pred = x_t - t v, so with v+ = beta v_theta + (1 - beta) v_old and
    v- = (1 + beta) v_old - beta v_theta the implicit policies' predictions are (x0 is affine in
    the velocity, as it is in epsilon and v for SD/SDXL):

        x0+ = beta x0_theta + (1 - beta) x0_old
        x0- = (1 + beta) x0_old - beta x0_theta
        L±  = mean_chw((x0± - x0)^2) / sg(max(mean_chw|x0± - x0|, 1e-5))      (adaptive weight)
        r   = nft_optimality(advantages, m)
        policy = m * mean_B(r L+ + (1 - r) L-) / beta,    m = adv_clip_max
        loss   = policy + kl_beta * mean_B(kl)

    kl: optional [B] per-sample ||v_theta - v_ref||^2 to the reference (LoRA off). The weights are
    computed in fp64 and detached, as in the reference. Metrics (detached 0-d tensors): policy_loss,
    positive_loss, negative_loss (means of L+ and L-), r (mean), old_gap = mean((x0_theta - x0_old)^2),
    kl_ref when given, loss.
    """
    dims = tuple(range(1, x0.ndim))
    x0_theta, x0_old, x0 = x0_theta.float(), x0_old.float(), x0.float()
    old = x0_old.detach()
    positive = beta * x0_theta + (1.0 - beta) * old
    negative = (1.0 + beta) * old - beta * x0_theta

    def weighted_regression(prediction: Tensor) -> Tensor:
        with torch.no_grad():
            weight = (prediction.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((prediction - x0) ** 2 / weight.float()).mean(dim=dims)

    positive_loss, negative_loss = weighted_regression(positive), weighted_regression(negative)
    r = nft_optimality(advantages.to(x0.device), adv_clip_max)
    policy_loss = ((r * positive_loss + (1.0 - r) * negative_loss) / beta * adv_clip_max).mean()
    loss = policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "positive_loss": positive_loss.detach().mean(),
        "negative_loss": negative_loss.detach().mean(),
        "r": r.mean(),
        "old_gap": ((x0_theta.detach() - old) ** 2).mean(),
    }
    if kl is not None:
        kl_mean = kl.float().mean()
        loss = policy_loss + kl_beta * kl_mean
        metrics["kl_ref"] = kl_mean.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
