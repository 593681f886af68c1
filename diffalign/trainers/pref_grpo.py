"""GRPO for diffusion (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470) with pointwise rewards
(``method: grpo``) or pairwise win rates (``method: pref_grpo``; Pref-GRPO, Wang et al. 2025,
arXiv 2508.20751).

Each round samples a group of G images per prompt from one starting noise with a stochastic
sampler that records every transition's log-probability (the flow SDE with
``std = a sqrt(sigma / (1 - sigma))`` for FLUX, DDIM with eta for SD/SDXL), and rewards them:

* ``grpo``: any registry reward, one score per image;
* ``pref_grpo``: every pair of the group is judged by the reward's ``compare`` (a pairwise VLM
  judge, or the Bradley-Terry comparison of a pointwise scorer), a win counts 1, a tie 0.5, and
  an image's reward is its win rate ``wins / (G - 1)``.

Advantages are the rewards normalised within each group, ``(r - mean_group) / (std + eps)``
(``global_std``: one std over every image of the round, as Flow-GRPO's default;
``per_prompt_stat_tracking``: groups of one prompt text pooled), clipped to
``[-adv_clip_max, adv_clip_max]``; several rewards are combined by ``advantage_aggregation``
(see ``grpo_maths``). The policy then takes ``num_inner_epochs`` passes over the round with the
clipped-ratio loss against the sampling-time log-probabilities on a ``timestep_fraction`` of the
sampler steps (``timestep_selection``, ``ignore_last``), optionally plus ``kl_beta`` times the KL
to the reference (LoRA off; ``kl_form``). ``negative: true`` negates the reward (Diffusion-NPO)
and marks the final LoRA negative.

Today's Flow-GRPO practice, as options: an SDE window (``sde_window_size``: the ODE outside a
window of W steps, the SDE inside it, only the window trained; Flow-GRPO-Fast, MixGRPO),
coefficients-preserving sampling (``sde_type: cps``), CFG-free training (``guidance_scale: 1``),
GRPO-Guard's per-step ratio normalisation (``ratio_norm``), a static schedule shift
(``schedule_shift``, Pref-GRPO).

Batch arithmetic: a round is ``prompts_per_round`` groups of ``group_size`` images per process;
each inner epoch splits them into micro-batches of ``train.batch_size`` images, and every
``train.gradient_accumulation_steps`` micro-batches make one optimizer step. ``train.max_steps``
counts optimizer steps.

A checkpoint taken inside a round (``checkpoint_every`` not a multiple of the round's steps, or a
stop by Ctrl-C / SIGTERM) keeps each process's round in ``TrainingState.process_tensors``: the
chains, their log-probs, advantages, metrics, shuffle and position; a run resumed from it finishes
that round exactly as the straight run would have.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from diffalign.config import BaseRunConfig, register_method
from diffalign.data import BUILTIN_PROMPTS, load_prompts
from diffalign.errors import UserError
from diffalign.losses import gaussian_mean_kl, grpo_loss, ratio_normalised_log_ratio, squared_error_log_ratio
from diffalign.on_policy import OnPolicyCheck
from diffalign.pipelines.base import DiffusionPolicy, Trajectory
from diffalign.run import Run, TrainingState
from diffalign.trainers.grpo_maths import (
    aggregate_advantages,
    candidate_steps,
    group_advantages,
    per_prompt_advantages,
    place_sde_window,
    select_train_steps,
    train_step_count,
)
from diffalign.training import (
    DEFAULT_GUIDANCE,
    EvalSettings,
    build_optimization,
    end_step,
    evaluate_reward,
    finish_run,
    load_frozen_reward,
    load_trainable_policy,
    log_start_evaluation,
)
from diffalign.trainers.d3po import DEFAULT_NOISE_LEVEL, check_reward_spec, sampling_conditioning

# --- rewards and advantages (pure) -----------------------------------------------------------


def pairwise_win_rates(prefs: Tensor, tie_margin: float = 0.0) -> Tensor:
    """Pref-GRPO rewards: the win rate of each image against the rest of its group.

    prefs: [N, G, G] with ``prefs[n, i, j] = P(image i beats image j)`` for i < j (only the upper
    triangle is read). Each judged pair is a win (1) for i if P > 0.5 + tie_margin, a loss (0) if
    P < 0.5 - tie_margin, else a tie (0.5 each). Returns [N, G] = wins / (G - 1) in [0, 1]; the
    win rates of a group always average 0.5.
    """
    n, g, _ = prefs.shape
    if g < 2:
        raise ValueError(f"a group needs at least 2 images to compare, got {g}")
    prefs = prefs.float()
    outcome = torch.full_like(prefs, 0.5)
    outcome = torch.where(prefs > 0.5 + tie_margin, torch.ones_like(prefs), outcome)
    outcome = torch.where(prefs < 0.5 - tie_margin, torch.zeros_like(prefs), outcome)
    upper = torch.triu(torch.ones(g, g, dtype=torch.bool, device=prefs.device), diagonal=1)
    outcome = torch.where(upper, outcome, torch.zeros_like(outcome))
    outcome = outcome + (1.0 - outcome.transpose(1, 2)) * upper.T  # j's result against i
    return outcome.sum(dim=2) / (g - 1)


def judge_groups(reward, images: Tensor, prompts: list[str], group_size: int) -> Tensor:
    """Run ``reward.compare`` on every pair (i < j) of each group, in one batched call.

    images: [N * G, 3, H, W] in [0, 1], groups consecutive; prompts: one per image.
    Returns prefs [N, G, G] with P(i beats j) in the upper triangle (0 elsewhere).
    """
    g = group_size
    n = images.shape[0] // g
    i_idx, j_idx = torch.triu_indices(g, g, offset=1)
    base = (torch.arange(n) * g).repeat_interleave(len(i_idx))
    first, second = base + i_idx.repeat(n), base + j_idx.repeat(n)
    p = reward.compare(images[first], images[second], [prompts[k] for k in first.tolist()]).float().cpu()
    prefs = torch.zeros(n, g, g)
    prefs[:, i_idx, j_idx] = p.view(n, -1)
    return prefs


def join_group_rewards(parts: list[tuple[dict[str, Tensor], dict[str, float], Tensor | None]]):
    """Concatenate :meth:`GRPOTrainer.group_rewards` of consecutive groups along the group axis."""
    components = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    judged = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return components, parts[0][1], judged


# --- config ----------------------------------------------------------------------------------


class GRPOSettings(BaseModel):
    """Group sampling, rewards and the clipped-ratio policy update."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict = Field(..., description="Registry reward spec (pointwise score; pref_grpo: its compare judges pairs).")
    prompts: list[str] | str = Field(
        default_factory=lambda: list(BUILTIN_PROMPTS), description="Training prompts: a list or a text file (one per line)."
    )
    group_size: int = Field(8, ge=2, description="G images per prompt, sampled from one starting noise.")
    prompts_per_round: int = Field(1, ge=1, description="Groups (prompts) sampled per process per round.")
    sample_batch_size: int | None = Field(None, ge=1, description="Chains per sampler call; null = the whole round at once.")
    async_scoring: bool = Field(
        False, description="Score each sampler call's images on a worker thread while the next call samples (a "
        "remote reward or judge then overlaps its latency with sampling); needs sample_batch_size to be a multiple of "
        "group_size (whole groups per call). The rewards, advantages and updates equal those of scoring the round "
        "after sampling, except for a composite that standardises over its batch.")
    same_noise: bool = Field(True, description="All images of a group start from the same noise (false: independent).")
    num_steps: int = Field(10, ge=1, description="Sampler steps T per image.")
    guidance_scale: float | None = Field(
        None, ge=0, description="CFG scale while sampling and training; null = the family default. 1.0 = CFG-free "
        "training (Flow-GRPO's no-CFG configs, DiffusionNFT): one denoiser pass per step, no negative branch; "
        "eval.guidance_scale stays separate.")
    negative_prompt: str | None = Field(None, description="Negative prompt of the CFG branch (FLUX: true CFG); null = ''.")
    noise_level: float | None = Field(
        None, gt=0, description="Flow-SDE a (FLUX) or DDIM eta (SD/SDXL); null = 0.7 (FLUX), 1.0 (SD/SDXL)."
    )
    sde_type: Literal["sde", "cps"] = Field(
        "sde", description="The stochastic step: sde = Flow-GRPO's flow SDE (DDIM eta for SD/SDXL); cps = "
        "coefficients-preserving sampling, std = sigma_next sin(a pi / 2) (flow models only).")
    cps_log_prob: Literal["gaussian", "flow_grpo"] = Field(
        "gaussian", description="The CPS step's log-ratio: gaussian = of its Gaussian log-probs; flow_grpo = of "
        "Flow-GRPO's -mean((x - mean)^2), i.e. 2 std^2 times the Gaussian one (the clip range then means what the "
        "reference's does).")
    sde_window_size: int = Field(
        0, ge=0, description="SDE window (Flow-GRPO-Fast, MixGRPO): sample W steps with the SDE and the rest "
        "with the ODE (DDIM eta 0), and train only the window's steps; 0 = the SDE at every step.")
    sde_window_range: tuple[int, int] | None = Field(
        None, description="[lo, hi): the steps the window may cover (Flow-GRPO-Fast: [0, T // 2]); null = all T.")
    sde_window_placement: Literal["random", "sliding"] = Field(
        "random", description="Where each round's window lies: random start (Flow-GRPO-Fast), or sliding one step "
        "per round through the range and wrapping (MixGRPO).")
    schedule_shift: float | None = Field(
        None, gt=0, description="Flow models: a static shift of the sigma schedule, shift s / (1 + (shift - 1) s) on "
        "linspace(1, 0, T + 1) (Pref-GRPO: 3); null = the family's own schedule (FLUX: resolution-dependent).")
    max_sequence_length: int | None = Field(
        None, ge=1, description="T5 tokens of the prompt (FLUX/SD3; Flow-GRPO: 128); null = the family default.")
    clip_range: float = Field(1e-4, gt=0, description="PPO clip range of the ratio exp(logp - logp_old) (Flow-GRPO: 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to [-adv_clip_max, adv_clip_max].")
    global_std: bool = Field(False, description="Normalise by the std over the whole round instead of each group's.")
    advantage_std: Literal["population", "unbiased"] = Field(
        "population", description="The std estimate of the advantages: population (Flow-GRPO, numpy) or unbiased "
        "(Pref-GRPO, torch's default).")
    advantage_eps: float = Field(1e-4, gt=0, description="Added to the std (Flow-GRPO 1e-4, Pref-GRPO 1e-8).")
    per_prompt_stat_tracking: bool = Field(
        False, description="Flow-GRPO's per-prompt stat tracking: normalise over every image of the same prompt text "
        "in the round (all processes), so a prompt drawn twice is pooled; false = per group.")
    advantage_aggregation: Literal["reward_sum", "advantage_sum", "gdpo"] = Field(
        "reward_sum", description="Several rewards (a composite's parts; pref_grpo's win rate and pointwise_rewards): "
        "reward_sum normalises the weighted reward sum (Flow-GRPO); advantage_sum sums the weighted per-reward "
        "advantages; gdpo sums them and re-normalises over the round (Pref-GRPO --apply_gdpo).")
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference (LoRA off); 0 = no reference passes.")
    kl_form: Literal["paper", "flow_grpo"] = Field(
        "paper", description="The per-step KL: paper = (mean - mean_ref)^2 / (2 std^2) (Flow-GRPO's paper, Pref-GRPO's "
        "code); flow_grpo = divided by g^2 instead (Flow-GRPO's code), i.e. the paper's times |dt|, weaker at equal kl_beta.")
    ratio_norm: bool = Field(
        False, description="GRPO-Guard ratio normalisation (Pref-GRPO --rationorm): de-bias and rescale each step's "
        "log-ratio so its mean is 0 at every step, and weight the step's loss by 1 / |dt|.")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="Share of the candidate sampler steps trained per chain.")
    timestep_selection: Literal["random_per_batch", "first", "random_per_sample"] = Field(
        "random_per_batch", description="Which steps: random_per_batch = one random subset per micro-batch; first = "
        "the first int(fraction T) in order (Flow-GRPO); random_per_sample = a random subset per chain (Pref-GRPO).")
    ignore_last: bool = Field(False, description="Never train the last sampler step (Pref-GRPO --ignore_last).")
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each round's samples.")
    negative: bool = Field(False, description="Diffusion-NPO: negate the reward to train a negative LoRA.")

    @model_validator(mode="after")
    def _window_fits(self) -> "GRPOSettings":
        if self.cps_log_prob == "flow_grpo" and (self.sde_type != "cps" or self.ratio_norm):
            raise ValueError("cps_log_prob: flow_grpo needs sde_type: cps and ratio_norm: false")
        if self.sde_window_size:
            lo, hi = self.sde_window_range if self.sde_window_range is not None else (0, self.num_steps)
            if not (0 <= lo < hi <= self.num_steps) or self.sde_window_size > hi - lo:
                raise ValueError(
                    f"sde_window_size {self.sde_window_size} must fit in sde_window_range [{lo}, {hi}) within the "
                    f"{self.num_steps} sampler steps")
        elif self.sde_window_range is not None:
            raise ValueError("sde_window_range needs sde_window_size > 0")
        return self


class PrefGRPOSettings(GRPOSettings):
    """Pref-GRPO: pairwise judgements turned into win rates."""

    tie_margin: float = Field(
        0.0, ge=0, lt=0.5, description="A judged pair with |P(a beats b) - 0.5| <= tie_margin is a tie (0.5 each)."
    )
    win_rate_weight: float = Field(1.0, ge=0, description="Weight of the win-rate reward among the rewards.")
    pointwise_rewards: dict[str, float] = Field(
        default_factory=dict, description="Pointwise rewards scored alongside the judge, {spec: weight} (Pref-GRPO's "
        "current default: win rate 0.4 + clip 0.6), combined by advantage_aggregation.")


def _check_settings(cfg: BaseRunConfig, settings: GRPOSettings, key: str) -> None:
    """The reward must exist and a round must split into whole optimizer steps."""
    check_reward_spec(settings.reward, f"{key}.reward")
    for spec in getattr(settings, "pointwise_rewards", {}):
        check_reward_spec(spec, f"{key}.pointwise_rewards")
    if settings.ignore_last:
        lo, hi = settings.sde_window_range or (0, settings.num_steps)
        if settings.num_steps == 1 or (settings.sde_window_size == 1 and hi == settings.num_steps):
            raise UserError(
                f"config error: {key}.ignore_last: it drops the last sampler step, which "
                + ("is the only one" if settings.num_steps == 1 else f"a 1-step {key}.sde_window can be placed on")
                + f"; set {key}.ignore_last=false"
                + ("" if settings.num_steps == 1 else f" or end {key}.sde_window_range before step {hi - 1}")
            )
    if settings.async_scoring and (settings.sample_batch_size or 0) % settings.group_size:
        raise UserError(
            f"config error: {key}.async_scoring scores whole groups per sampler call: set {key}.sample_batch_size "
            f"to a multiple of {key}.group_size = {settings.group_size} (it is {settings.sample_batch_size})"
        )
    round_size = settings.prompts_per_round * settings.group_size
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    if round_size % per_step:
        raise UserError(
            f"config error: {key}.prompts_per_round x {key}.group_size = {round_size} images per round is not a "
            f"multiple of train.batch_size x train.gradient_accumulation_steps = {per_step}; change one of them"
        )


class GRPOConfig(BaseRunConfig):
    batch_unit: ClassVar[str] = "images"
    method: Literal["grpo"] = "grpo"
    grpo: GRPOSettings = Field(..., description="GRPO with pointwise rewards.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")

    @model_validator(mode="after")
    def _round(self) -> "GRPOConfig":
        _check_settings(self, self.grpo, "grpo")
        return self


class PrefGRPOConfig(BaseRunConfig):
    batch_unit: ClassVar[str] = "images"
    method: Literal["pref_grpo"] = "pref_grpo"
    pref_grpo: PrefGRPOSettings = Field(..., description="Pref-GRPO: pairwise win-rate rewards.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")

    @model_validator(mode="after")
    def _round(self) -> "PrefGRPOConfig":
        _check_settings(self, self.pref_grpo, "pref_grpo")
        return self


register_method("grpo", GRPOConfig, "diffalign.trainers.pref_grpo:GRPOTrainer")
register_method("pref_grpo", PrefGRPOConfig, "diffalign.trainers.pref_grpo:PrefGRPOTrainer")


# --- trainer ---------------------------------------------------------------------------------


class GRPOTrainer:
    """``GRPOTrainer(config).train()`` -> the directory of the final LoRA. Serves both ``grpo``
    (pointwise) and ``pref_grpo`` (pairwise win rate) configs."""

    def __init__(self, config: GRPOConfig | PrefGRPOConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite
        self.pairwise = isinstance(config, PrefGRPOConfig)
        self.settings: GRPOSettings = config.pref_grpo if self.pairwise else config.grpo

    # --- 1. sample ------------------------------------------------------------------------------

    def sampling_settings(self, policy: DiffusionPolicy) -> tuple[float, float]:
        """(guidance scale, noise level) of the sampler: the settings, or the family's defaults."""
        s = self.settings
        guidance = DEFAULT_GUIDANCE[policy.family] if s.guidance_scale is None else s.guidance_scale
        noise_level = DEFAULT_NOISE_LEVEL[policy.family] if s.noise_level is None else s.noise_level
        return guidance, noise_level

    @torch.no_grad()
    def round_conditioning(self, policy: DiffusionPolicy, prompts: list[str]):
        """The conditioning of a round's chains: each prompt's, G times in a row."""
        guidance, _ = self.sampling_settings(policy)
        return sampling_conditioning(policy, prompts, guidance, self.settings.negative_prompt).repeat_interleave(
            self.settings.group_size
        )

    @torch.no_grad()
    def sample_round(self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator,
                     sde_window: tuple[int, int] | None = None, on_images=None) -> Trajectory:
        """G chains per prompt (groups consecutive), in sampler calls of ``sample_batch_size``;
        stochastic only inside ``sde_window`` when one is given. ``on_images(first, images)`` is
        called after each sampler call with the index of its first chain (``async_scoring``)."""
        s = self.settings
        size = policy.default_resolution()
        guidance, noise_level = self.sampling_settings(policy)
        cond = self.round_conditioning(policy, prompts)
        total = len(prompts) * s.group_size
        latents = policy.initial_noise(total, size, size, generator, group_size=s.group_size if s.same_noise else 1)
        chunk = s.sample_batch_size or total
        parts = []
        for i in range(0, total, chunk):
            parts.append(policy.sample(cond.select(slice(i, i + chunk)), s.num_steps, guidance_scale=guidance,
                                       noise_level=noise_level, generator=generator, latents=latents[i : i + chunk],
                                       sde_type=s.sde_type, sde_window=sde_window, schedule_shift=s.schedule_shift,
                                       record_means=s.ratio_norm))
            if on_images is not None:
                on_images(i, parts[-1].images)
        return dataclasses.replace(
            parts[0], cond=cond, latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]), images=torch.cat([p.images for p in parts]),
            final_latents=torch.cat([p.final_latents for p in parts]),
            means=torch.cat([p.means for p in parts]) if s.ratio_norm else None,
        )

    # --- 2. score -------------------------------------------------------------------------------

    @torch.no_grad()
    def score_rewards(self, reward, images: Tensor, prompts: list[str],
                      pointwise: dict | None = None) -> tuple[dict[str, Tensor], dict[str, float], dict[str, float]]:
        """The rewards of a round, one [N, G] tensor per reward (negated for NPO), their weights
        and the round's metrics (of the un-negated rewards).

        grpo: the reward's scores; a ``composite`` reward is split into its parts unless
        ``advantage_aggregation`` is ``reward_sum``. pref_grpo: the win rates from the reward's
        ``compare``, plus each of ``pointwise`` ({name: built reward}, weights from
        ``pointwise_rewards``)."""
        return self.round_rewards(*self.group_rewards(reward, images, prompts, pointwise))

    @torch.no_grad()
    def group_rewards(self, reward, images: Tensor, prompts: list[str], pointwise: dict | None = None
                      ) -> tuple[dict[str, Tensor], dict[str, float], Tensor | None]:
        """What :meth:`score_rewards` computes group by group, for any whole groups of a round:
        ({name: [n, G] rewards}, their weights, the judged pair probabilities [n, G(G-1)/2] or None),
        so the round's parts can be scored as they are sampled (``async_scoring``) and joined."""
        s = self.settings
        images, g = images.float(), s.group_size
        images_prompts = [p for p in prompts for _ in range(g)]
        components: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        judged = None
        if self.pairwise:
            prefs = judge_groups(reward, images, images_prompts, g)
            components["win_rate"], weights["win_rate"] = pairwise_win_rates(prefs, s.tie_margin), s.win_rate_weight
            i_idx, j_idx = torch.triu_indices(g, g, offset=1)
            judged = prefs[:, i_idx, j_idx]
            for spec, part in (pointwise or {}).items():
                components[spec] = part(images, images_prompts).float().cpu().view(len(prompts), g)
                weights[spec] = s.pointwise_rewards[spec]
        elif s.advantage_aggregation != "reward_sum" and hasattr(reward, "part_names"):  # a composite's parts
            for name, part, weight in zip(reward.part_names, reward.parts.values(), reward.weights):
                components[name] = part(images, images_prompts).float().cpu().view(len(prompts), g)
                weights[name] = weight
        else:
            components[reward.name] = reward(images, images_prompts).float().cpu().view(len(prompts), g)
            weights[reward.name] = 1.0
        return components, weights, judged

    def round_rewards(self, components: dict[str, Tensor], weights: dict[str, float], judged: Tensor | None
                      ) -> tuple[dict[str, Tensor], dict[str, float], dict[str, float]]:
        """A round's :meth:`group_rewards` -> (components, negated for NPO; weights; the round's metrics)."""
        s = self.settings
        metrics: dict[str, float] = {}
        if judged is not None:
            rates = components["win_rate"]
            metrics = {"win_rate_std": rates.std(dim=1, unbiased=False).mean().item(),
                       "win_rate_max": rates.max(dim=1).values.mean().item(),
                       "tie_frac": ((judged - 0.5).abs() <= s.tie_margin).float().mean().item()}
        total = sum(weights[k] * components[k] for k in components)
        if len(components) > 1:
            metrics.update({f"reward/{k}": v.mean().item() for k, v in components.items()})
        metrics.update({"reward": total.mean().item(), "reward_std": total.std(unbiased=False).item(),
                        "zero_std_frac": (total.std(dim=1) == 0).float().mean().item()})
        if s.negative:
            components = {k: -v for k, v in components.items()}
        return components, weights, metrics

    @torch.no_grad()
    def score(self, reward, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, float]]:
        """Rewards [N, G] of a round (the weighted sum of :meth:`score_rewards`) and metrics."""
        components, weights, metrics = self.score_rewards(reward, images, prompts)
        return sum(weights[k] * components[k] for k in components), metrics

    # --- 3. advantages --------------------------------------------------------------------------

    def advantages(self, components: dict[str, Tensor], weights: dict[str, float], prompts: list[str]) -> Tensor:
        """Advantages [N, G] of the gathered round: ``components`` {name: [N, G]}, ``prompts`` the
        N groups' prompt texts (for per-prompt stat tracking)."""
        s = self.settings
        options = dict(eps=s.advantage_eps, std=s.advantage_std)
        if s.per_prompt_stat_tracking:
            def normalise(r):
                return per_prompt_advantages(r, prompts, s.global_std, **options)
        else:
            def normalise(r):
                return group_advantages(r, s.global_std, **options)
        return aggregate_advantages(components, weights, s.advantage_aggregation, normalise, s.adv_clip_max, **options)

    # --- 4. update ------------------------------------------------------------------------------

    on_policy_check: OnPolicyCheck | None = None

    def grpo_step(
        self, policy: DiffusionPolicy, trajectory: Trajectory, advantages: Tensor, step: int | Tensor,
        on_policy: bool = False,
    ) -> tuple[Tensor, dict[str, float]]:
        """Clipped-ratio loss (+ KL to the reference) at sampler step ``step`` (one index, or one
        per chain [B]); gradients flow into the LoRA. The metrics include the importance ratio's
        statistics (:mod:`diffalign.on_policy`), checked against 1 when ``on_policy`` (no update
        since the round was sampled) for the first time in the run."""
        s = self.settings
        log_prob, mean, std = policy.step_distribution(trajectory, step)
        device = trajectory.latents.device
        steps = torch.full((len(trajectory),), step, device=device) if isinstance(step, int) else step.to(device)
        rows = torch.arange(len(trajectory), device=device)
        old_log_prob = trajectory.log_probs[rows, steps]
        dt = (trajectory.timesteps[steps] - trajectory.next_timesteps[steps]).float().to(log_prob.device) / 1000.0
        kl = None
        if s.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                _, ref_mean, _ = policy.step_distribution(trajectory, step)
            kl = gaussian_mean_kl(mean, ref_mean, std, dt if s.kl_form == "flow_grpo" else None)
        log_ratio, weight = None, 1.0
        if s.cps_log_prob == "flow_grpo":
            log_ratio = squared_error_log_ratio(log_prob, old_log_prob, std)
        if s.ratio_norm:
            log_ratio = ratio_normalised_log_ratio(log_prob, old_log_prob, mean, trajectory.means[rows, steps], std)
            weight = 1.0 / dt
        loss, metrics = grpo_loss(log_prob, old_log_prob, advantages.to(log_prob.device), s.clip_range, kl, s.kl_beta,
                                  log_ratio=log_ratio, policy_weight=weight)
        if self.on_policy_check is not None:
            metrics.update(self.on_policy_check(log_prob, old_log_prob, on_policy))
        return loss, metrics

    # --- a round across a checkpoint -------------------------------------------------------------

    def round_buffer(self, picks: Tensor, trajectory: Trajectory, advantages: Tensor,
                     metrics: dict[str, float]) -> dict[str, Tensor]:
        """What the rest of a round's updates read, for ``TrainingState.process_tensors``: the
        prompt picks [N], the chains [N*G, T+1, C, h, w] and their sampling-time log-probs
        [N*G, T], the advantages [N*G] and the round's metrics (as float64 scalars). The
        conditioning and timesteps are recomputed from the picks on restore. With an SDE window,
        its [start, end]; with ``ratio_norm``, the sampling-time step means."""
        buffer = {"round.picks": picks, "round.latents": trajectory.latents,
                  "round.log_probs": trajectory.log_probs, "round.advantages": advantages}
        if trajectory.sde_window is not None:
            buffer["round.sde_window"] = torch.tensor(trajectory.sde_window)
        if trajectory.means is not None:
            buffer["round.means"] = trajectory.means
        buffer.update({f"round.metric.{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in metrics.items()})
        return buffer

    def restore_round(self, tensors: dict[str, Tensor], policy: DiffusionPolicy, prompts: list[str], run: Run):
        """The round a checkpoint was taken inside, from its :meth:`round_buffer` plus the shuffle
        ``round.order`` and ``round.position`` (inner epoch, first image of the next micro-batch):
        (trajectory, advantages, metrics, buffer, order, epoch, start)."""
        s = self.settings
        picks, latents = tensors["round.picks"], tensors["round.latents"]
        expected = (s.prompts_per_round * s.group_size, s.num_steps + 1)
        if tuple(latents.shape[:2]) != expected or int(picks.max()) >= len(prompts):
            raise UserError(
                f"the checkpoint was taken inside a round sampled with other {self.cfg.method}.prompts_per_round, "
                "group_size, num_steps or prompts; resume with the settings it was saved with"
            )
        guidance, noise_level = self.sampling_settings(policy)
        size = policy.default_resolution()
        timesteps, next_timesteps = policy.sampling_schedule(s.num_steps, size, size, s.schedule_shift)
        with run.accelerator.autocast():
            cond = self.round_conditioning(policy, [prompts[i] for i in picks.tolist()])
        window = tensors.get("round.sde_window")
        means = tensors.get("round.means")
        trajectory = Trajectory(
            latents=latents.to(policy.device), log_probs=tensors["round.log_probs"].to(policy.device),
            timesteps=timesteps, next_timesteps=next_timesteps, cond=cond, guidance_scale=guidance,
            noise_level=noise_level, sde_type=s.sde_type, sde_window=None if window is None else tuple(window.tolist()),
            means=None if means is None else means.to(policy.device),
        )
        advantages = tensors["round.advantages"]
        metrics = {k.removeprefix("round.metric."): v.item() for k, v in tensors.items() if k.startswith("round.metric.")}
        buffer = self.round_buffer(picks, trajectory, advantages, metrics)
        epoch, start = tensors["round.position"].tolist()
        return trajectory, advantages, metrics, buffer, tensors["round.order"], epoch, start

    def check_family(self, policy: DiffusionPolicy) -> None:
        """Options the loaded model's family cannot honour end the run before any sampling."""
        s, key = self.settings, self.cfg.method
        if s.sde_type not in policy.sde_types:
            raise UserError(f"config error: {key}.sde_type: {s.sde_type!r} needs a flow-matching model; the "
                            f"{policy.family} family has {', '.join(policy.sde_types)}")
        if s.schedule_shift is not None and getattr(policy, "prediction_type", None) != "flow":
            raise UserError(f"config error: {key}.schedule_shift: the {policy.family} family has no flow schedule to "
                            "shift; remove it")
        if s.max_sequence_length is not None:
            if not hasattr(policy, "max_sequence_length"):
                raise UserError(f"config error: {key}.max_sequence_length: the {policy.family} family has no T5 "
                                "prompt length; remove it")
            policy.max_sequence_length = s.max_sequence_length

    def evaluate(self, policy: DiffusionPolicy, reward) -> dict[str, float]:
        """The mean reward of fixed samples (if ``eval.reward``)."""
        return {} if reward is None else {f"eval/{reward.name}": evaluate_reward(policy, reward, self.cfg.eval)}

    # --- the loop ---------------------------------------------------------------------------------

    def train(self):
        cfg, s = self.cfg, self.settings
        key = cfg.method
        run = Run(cfg, overwrite=self.overwrite)
        policy, params = load_trainable_policy(cfg, run)
        self.policy = policy
        self.check_family(policy)
        optimizer, lr_scheduler = build_optimization(cfg, params)
        prompts = load_prompts(s.prompts, key=f"{key}.prompts")
        reward = load_frozen_reward(s.reward, run.device)
        pointwise = {spec: load_frozen_reward(spec, run.device) for spec in getattr(s, "pointwise_rewards", {})}
        rank = run.accelerator.process_index
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
        pick_generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank + 1)
        state = TrainingState(
            params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator, "picks": pick_generator},
        )
        start_step = run.restore(state)

        round_size = s.prompts_per_round * s.group_size
        micro, accumulation = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        steps_per_round = s.num_inner_epochs * round_size // (micro * accumulation)
        self.on_policy_check = OnPolicyCheck(run.weight_dtype, sample_batch=s.sample_batch_size or round_size,
                                             train_batch=micro, method=key)
        window_steps = s.sde_window_size or s.num_steps
        candidates = window_steps - (1 if s.ignore_last and not s.sde_window_size else 0)
        trained = train_step_count(candidates, s.timestep_fraction)
        n = run.num_processes
        run.print(
            f"round: {s.prompts_per_round} prompts x {s.group_size} images per process x {n} processes = "
            f"{round_size * n} images per round\n"
            f"update: {s.num_inner_epochs} inner epoch(s) x {round_size // micro} micro-batches of {micro} images "
            f"-> {steps_per_round} optimizer steps per round ({micro * accumulation * n} images per optimizer step, "
            f"{trained} of {s.num_steps} sampler steps each ({s.timestep_selection}"
            + (f", SDE window of {s.sde_window_size} steps, {s.sde_window_placement}" if s.sde_window_size else "")
            + (", last step never" if s.ignore_last else "") + "))\n"
            f"training: {cfg.train.max_steps} optimizer steps = {cfg.train.max_steps / steps_per_round:g} rounds"
        )
        mode = (f"pairwise win rate from {reward.name}.compare, {s.group_size * (s.group_size - 1) // 2} pairs per group"
                if self.pairwise else f"pointwise reward {reward.name}")
        run.print(
            f"model {cfg.model} ({policy.family}), {policy.default_resolution()}px, {sum(p.numel() for p in params):,} "
            f"LoRA parameters; {key}: {mode}, clip_range {s.clip_range}, kl_beta {s.kl_beta}, "
            f"{'global' if s.global_std else 'group'} {s.advantage_std} std + {s.advantage_eps:g}"
            + (", per-prompt stat tracking" if s.per_prompt_stat_tracking else "")
            + (f", {s.advantage_aggregation} over {1 + len(pointwise)} rewards" if pointwise else "")
            + f", sde_type {s.sde_type}, kl_form {s.kl_form}" + (", ratio_norm" if s.ratio_norm else "")
            + (f", schedule shift {s.schedule_shift:g}" if s.schedule_shift else "")
            + (", NEGATIVE (reward negated)" if s.negative else "")
        )
        eval_reward = None if cfg.eval.reward is None else load_frozen_reward(cfg.eval.reward, run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, eval_reward))

        step = start_step
        # async_scoring: one worker scores each sampler call's images while the next one samples
        scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-score") if s.async_scoring else None
        resumed = self.restore_round(state.process_tensors, policy, prompts, run) if state.process_tensors else None
        if resumed is not None:
            run.print(f"continuing the round in progress: inner epoch {resumed[-2] + 1}, from image {resumed[-1]}")
        while step < cfg.train.max_steps:
            if resumed is not None:
                # a checkpoint taken inside a round: its samples, advantages and shuffle carry on
                trajectory, advantages, round_metrics, buffer, order, first_epoch, first_start = resumed
                resumed = None
            else:
                # 1. sample: a round of groups, every transition's log-probability recorded
                picks = torch.randint(len(prompts), (s.prompts_per_round,), generator=pick_generator)
                round_prompts = [prompts[i] for i in picks.tolist()]
                window = place_sde_window(s.num_steps, s.sde_window_size, s.sde_window_placement, s.sde_window_range,
                                          step // steps_per_round, pick_generator)
                scored = []  # async_scoring: each sampler call's groups, scored on the worker meanwhile
                on_images = None if scorer is None else lambda first, images: scored.append(scorer.submit(
                    self.group_rewards, reward, images, round_prompts[first // s.group_size:
                                                                      (first + len(images)) // s.group_size], pointwise))
                with run.accelerator.autocast():
                    trajectory = self.sample_round(policy, round_prompts, generator, window, on_images)
                # 2. score: pointwise rewards or win rates within each group
                if scorer is None:
                    parts = [self.group_rewards(reward, trajectory.images, round_prompts, pointwise)]
                else:
                    parts = [future.result() for future in scored]
                components, weights, round_metrics = self.round_rewards(*join_group_rewards(parts))
                # 3. advantages: normalised per group or prompt (or by the std of the whole round, over all processes)
                gathered = {k: run.accelerator.gather(v.to(run.device)).cpu() for k, v in components.items()}
                all_picks = run.accelerator.gather(picks.to(run.device)).cpu()
                advantages = self.advantages(gathered, weights, [prompts[i] for i in all_picks.tolist()])
                advantages = advantages.view(n, -1)[rank].view(-1)
                trajectory = dataclasses.replace(trajectory, images=None, final_latents=None)
                buffer = self.round_buffer(picks, trajectory, advantages, round_metrics)
                first_epoch, first_start = 0, 0
            # 4. update: inner epochs of clipped-ratio steps on shuffled micro-batches
            for epoch in range(first_epoch, s.num_inner_epochs):
                if first_start == 0:
                    order = torch.randperm(round_size, generator=pick_generator)
                for start in range(first_start, round_size, micro * accumulation):
                    if step == cfg.train.max_steps:
                        break
                    step += 1
                    metrics: dict[str, float | Tensor] = dict(round_metrics)
                    for m in range(accumulation):
                        index = order[start + m * micro : start + (m + 1) * micro]
                        batch = trajectory.select(index)
                        chosen = select_train_steps(candidate_steps(s.num_steps, s.ignore_last, trajectory.sde_window),
                                                    s.timestep_fraction, s.timestep_selection, len(index), pick_generator)
                        count = chosen.shape[1]
                        for column in chosen.T:
                            j = int(column[0]) if bool((column == column[0]).all()) else column
                            with run.accelerator.autocast():
                                loss, micro_metrics = self.grpo_step(policy, batch, advantages[index], j,
                                                                     on_policy=epoch == 0 and start == 0)
                            run.backward(loss / (accumulation * count))
                            for k, v in micro_metrics.items():
                                metrics[k] = metrics.get(k, 0.0) + v / (accumulation * count)
                    # where a checkpoint after this step resumes: the next micro-batch of this round
                    next_epoch, next_start = divmod(epoch * round_size + start + micro * accumulation, round_size)
                    state.process_tensors.clear()
                    if next_epoch < s.num_inner_epochs:  # else the round is done: a new one follows
                        position = torch.tensor([next_epoch, next_start])
                        state.process_tensors.update({**buffer, "round.order": order, "round.position": position})
                    end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                             evaluate=lambda: self.evaluate(policy, eval_reward))
                first_start = 0

        if scorer is not None:
            scorer.shutdown(wait=True)
        after = self.evaluate(policy, eval_reward)
        return finish_run(run, cfg, policy, before, after, {"negative": "true"} if s.negative else None)


class PrefGRPOTrainer(GRPOTrainer):
    """``PrefGRPOTrainer(config).train()``: GRPO whose rewards are pairwise win rates in each group."""
