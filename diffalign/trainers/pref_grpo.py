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

Advantages are the rewards normalised within each group, ``(r - mean_group) / (std + 1e-4)``
(``global_std``: one std over every image of the round, as Flow-GRPO's default), clipped to
``[-adv_clip_max, adv_clip_max]``. The policy then takes ``num_inner_epochs`` passes over the
round with the clipped-ratio loss against the sampling-time log-probabilities on a
``timestep_fraction`` of the sampler steps, optionally plus ``kl_beta`` times the KL to the
reference (LoRA off). ``negative: true`` negates the reward (Diffusion-NPO) and marks the final
LoRA negative.

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
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from diffalign.config import BaseRunConfig, register_method
from diffalign.data import BUILTIN_PROMPTS, load_prompts
from diffalign.errors import UserError
from diffalign.losses import gaussian_mean_kl, grpo_loss
from diffalign.pipelines.base import DiffusionPolicy, Trajectory
from diffalign.run import Run, TrainingState
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
from diffalign.trainers.d3po import DEFAULT_NOISE_LEVEL, check_reward_spec, sampling_conditioning, train_step_indices

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


def group_advantages(rewards: Tensor, global_std: bool = False, clip_max: float | None = None, eps: float = 1e-4) -> Tensor:
    """GRPO advantages from rewards [N, G] (N groups of G images of one prompt each):

        A = (r - mean over the group) / (std + eps)

    with the population std of the group, or of all N * G rewards when ``global_std`` (Flow-GRPO).
    ``clip_max`` clamps A to [-clip_max, clip_max]. Returns [N, G]. A group whose rewards are all
    equal gets A = 0.
    """
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(unbiased=False) if global_std else rewards.std(dim=1, unbiased=False, keepdim=True)
    advantages = centred / (std + eps)
    if clip_max is not None:
        advantages = advantages.clamp(-clip_max, clip_max)
    return advantages


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
    same_noise: bool = Field(True, description="All images of a group start from the same noise (false: independent).")
    num_steps: int = Field(10, ge=1, description="Sampler steps T per image.")
    guidance_scale: float | None = Field(None, ge=0, description="CFG scale while sampling and training; null = the family default.")
    negative_prompt: str | None = Field(None, description="Negative prompt of the CFG branch (FLUX: true CFG); null = ''.")
    noise_level: float | None = Field(
        None, gt=0, description="Flow-SDE a (FLUX) or DDIM eta (SD/SDXL); null = 0.7 (FLUX), 1.0 (SD/SDXL)."
    )
    clip_range: float = Field(1e-4, gt=0, description="PPO clip range of the ratio exp(logp - logp_old) (Flow-GRPO: 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to [-adv_clip_max, adv_clip_max].")
    global_std: bool = Field(False, description="Normalise by the std over the whole round instead of each group's.")
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference (LoRA off); 0 = no reference passes.")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="Share of the sampler steps trained per micro-batch (random).")
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each round's samples.")
    negative: bool = Field(False, description="Diffusion-NPO: negate the reward to train a negative LoRA.")


class PrefGRPOSettings(GRPOSettings):
    """Pref-GRPO: pairwise judgements turned into win rates."""

    tie_margin: float = Field(
        0.0, ge=0, lt=0.5, description="A judged pair with |P(a beats b) - 0.5| <= tie_margin is a tie (0.5 each)."
    )


def _check_settings(cfg: BaseRunConfig, settings: GRPOSettings, key: str) -> None:
    """The reward must exist and a round must split into whole optimizer steps."""
    check_reward_spec(settings.reward, f"{key}.reward")
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
    def sample_round(self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator) -> Trajectory:
        """G chains per prompt (groups consecutive), in sampler calls of ``sample_batch_size``."""
        s = self.settings
        size = policy.default_resolution()
        guidance, noise_level = self.sampling_settings(policy)
        cond = self.round_conditioning(policy, prompts)
        total = len(prompts) * s.group_size
        latents = policy.initial_noise(total, size, size, generator, group_size=s.group_size if s.same_noise else 1)
        chunk = s.sample_batch_size or total
        parts = [
            policy.sample(cond.select(slice(i, i + chunk)), s.num_steps, guidance_scale=guidance,
                          noise_level=noise_level, generator=generator, latents=latents[i : i + chunk])
            for i in range(0, total, chunk)
        ]
        return dataclasses.replace(
            parts[0], cond=cond, latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]), images=torch.cat([p.images for p in parts]),
            final_latents=torch.cat([p.final_latents for p in parts]),
        )

    # --- 2. score -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, reward, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, float]]:
        """Rewards [N, G] of a round (pointwise scores or win rates, negated for NPO) and metrics."""
        s = self.settings
        images_prompts = [p for p in prompts for _ in range(s.group_size)]
        if self.pairwise:
            prefs = judge_groups(reward, images.float(), images_prompts, s.group_size)
            rewards = pairwise_win_rates(prefs, s.tie_margin)
            i_idx, j_idx = torch.triu_indices(s.group_size, s.group_size, offset=1)
            judged = prefs[:, i_idx, j_idx]
            metrics = {"win_rate_std": rewards.std(dim=1, unbiased=False).mean().item(),
                       "win_rate_max": rewards.max(dim=1).values.mean().item(),
                       "tie_frac": ((judged - 0.5).abs() <= s.tie_margin).float().mean().item()}
        else:
            rewards = reward(images.float(), images_prompts).float().cpu().view(len(prompts), s.group_size)
            metrics = {}
        metrics.update({"reward": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                        "zero_std_frac": (rewards.std(dim=1) == 0).float().mean().item()})
        return (-rewards if s.negative else rewards), metrics

    # --- 4. update ------------------------------------------------------------------------------

    def grpo_step(
        self, policy: DiffusionPolicy, trajectory: Trajectory, advantages: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Clipped-ratio loss (+ KL to the reference) at sampler step ``step``; gradients flow into the LoRA."""
        s = self.settings
        log_prob, mean, std = policy.step_distribution(trajectory, step)
        kl = None
        if s.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                _, ref_mean, _ = policy.step_distribution(trajectory, step)
            kl = gaussian_mean_kl(mean, ref_mean, std)
        return grpo_loss(log_prob, trajectory.log_probs[:, step], advantages.to(log_prob.device), s.clip_range, kl, s.kl_beta)

    # --- a round across a checkpoint -------------------------------------------------------------

    def round_buffer(self, picks: Tensor, trajectory: Trajectory, advantages: Tensor,
                     metrics: dict[str, float]) -> dict[str, Tensor]:
        """What the rest of a round's updates read, for ``TrainingState.process_tensors``: the
        prompt picks [N], the chains [N*G, T+1, C, h, w] and their sampling-time log-probs
        [N*G, T], the advantages [N*G] and the round's metrics (as float64 scalars). The
        conditioning and timesteps are recomputed from the picks on restore."""
        buffer = {"round.picks": picks, "round.latents": trajectory.latents,
                  "round.log_probs": trajectory.log_probs, "round.advantages": advantages}
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
        timesteps, next_timesteps = policy.schedule(s.num_steps, size, size)
        with run.accelerator.autocast():
            cond = self.round_conditioning(policy, [prompts[i] for i in picks.tolist()])
        trajectory = Trajectory(
            latents=latents.to(policy.device), log_probs=tensors["round.log_probs"].to(policy.device),
            timesteps=timesteps, next_timesteps=next_timesteps, cond=cond, guidance_scale=guidance,
            noise_level=noise_level,
        )
        advantages = tensors["round.advantages"]
        metrics = {k.removeprefix("round.metric."): v.item() for k, v in tensors.items() if k.startswith("round.metric.")}
        buffer = self.round_buffer(picks, trajectory, advantages, metrics)
        epoch, start = tensors["round.position"].tolist()
        return trajectory, advantages, metrics, buffer, tensors["round.order"], epoch, start

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
        optimizer, lr_scheduler = build_optimization(cfg, params)
        prompts = load_prompts(s.prompts, key=f"{key}.prompts")
        reward = load_frozen_reward(s.reward, run.device)
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
        trained = max(1, min(s.num_steps, int(s.timestep_fraction * s.num_steps + 1e-9)))
        n = run.num_processes
        run.print(
            f"round: {s.prompts_per_round} prompts x {s.group_size} images per process x {n} processes = "
            f"{round_size * n} images per round\n"
            f"update: {s.num_inner_epochs} inner epoch(s) x {round_size // micro} micro-batches of {micro} images "
            f"-> {steps_per_round} optimizer steps per round ({micro * accumulation * n} images per optimizer step, "
            f"{trained} of {s.num_steps} sampler steps each)\n"
            f"training: {cfg.train.max_steps} optimizer steps = {cfg.train.max_steps / steps_per_round:g} rounds"
        )
        mode = (f"pairwise win rate from {reward.name}.compare, {s.group_size * (s.group_size - 1) // 2} pairs per group"
                if self.pairwise else f"pointwise reward {reward.name}")
        run.print(
            f"model {cfg.model} ({policy.family}), {policy.default_resolution()}px, {sum(p.numel() for p in params):,} "
            f"LoRA parameters; {key}: {mode}, clip_range {s.clip_range}, kl_beta {s.kl_beta}, "
            f"{'global' if s.global_std else 'group'} std" + (", NEGATIVE (reward negated)" if s.negative else "")
        )
        eval_reward = None if cfg.eval.reward is None else load_frozen_reward(cfg.eval.reward, run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, eval_reward))

        step = start_step
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
                with run.accelerator.autocast():
                    trajectory = self.sample_round(policy, round_prompts, generator)
                # 2. score: pointwise rewards or win rates within each group
                rewards, round_metrics = self.score(reward, trajectory.images, round_prompts)
                # 3. advantages: normalised per group (or by the std of the whole round, over all processes)
                all_rewards = run.accelerator.gather(rewards.to(run.device)).cpu()
                advantages = group_advantages(all_rewards, s.global_std, s.adv_clip_max)
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
                        steps = train_step_indices(s.num_steps, s.timestep_fraction, pick_generator)
                        for j in steps:
                            with run.accelerator.autocast():
                                loss, micro_metrics = self.grpo_step(policy, batch, advantages[index], j)
                            run.backward(loss / (accumulation * len(steps)))
                            for k, v in micro_metrics.items():
                                metrics[k] = metrics.get(k, 0.0) + v / (accumulation * len(steps))
                    # where a checkpoint after this step resumes: the next micro-batch of this round
                    next_epoch, next_start = divmod(epoch * round_size + start + micro * accumulation, round_size)
                    state.process_tensors.clear()
                    if next_epoch < s.num_inner_epochs:  # else the round is done: a new one follows
                        position = torch.tensor([next_epoch, next_start])
                        state.process_tensors.update({**buffer, "round.order": order, "round.position": position})
                    end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                             evaluate=lambda: self.evaluate(policy, eval_reward))
                first_start = 0

        after = self.evaluate(policy, eval_reward)
        return finish_run(run, cfg, policy, before, after, {"negative": "true"} if s.negative else None)


class PrefGRPOTrainer(GRPOTrainer):
    """``PrefGRPOTrainer(config).train()``: GRPO whose rewards are pairwise win rates in each group."""
