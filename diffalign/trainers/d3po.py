"""D3PO (Yang et al. 2023, arXiv 2311.13231): DPO on the denoising chain, no reward model needed.

For each prompt two chains are sampled from one starting noise (DDIM with eta, default 1, for
SD/SDXL; the flow SDE for FLUX), recording every transition's log-probability. A preference
says which chain won: from any registry reward (AI feedback: the higher score wins, ties are
skipped) or from a person, through ``diffalign sample`` and a labels file. Every recorded step
(or a random ``timestep_fraction`` of them) then gets the per-step DPO loss

    r      = clamp(exp(logp_policy - logp_ref), 1 - eps, 1 + eps)      for winner and loser
    loss   = -log sigmoid(beta * (log r_w - log r_l))

with the reference = the same denoiser with the LoRA disabled. ``d3po.negative: true`` inverts
the preference (Diffusion-NPO): the LoRA learns what the feedback dislikes, and the final LoRA is
marked ``negative``.

Human-feedback loop::

    diffalign sample configs/d3po/sd15.yaml --out feedback/   # trajectories, image pairs, labels.jsonl
    # fill "choice": 0 or 1 (the preferred image) in feedback/labels.jsonl, "tie" or null to skip
    diffalign train configs/d3po/sd15.yaml d3po.reward=null d3po.labels=feedback/labels.jsonl
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from diffalign.config import BaseRunConfig, describe_batch, register_method
from diffalign.data import BUILTIN_PROMPTS, EpochSampler, load_prompts
from diffalign.errors import UserError
from diffalign.losses import d3po_loss
from diffalign.pipelines.base import Conditioning, DiffusionPolicy, Trajectory
from diffalign.run import Run, TrainingState
from diffalign.training import (
    DEFAULT_GUIDANCE,
    EvalSettings,
    build_optimization,
    draw_prompts,
    end_step,
    evaluate_reward,
    finish_run,
    load_frozen_reward,
    load_trainable_policy,
    log_start_evaluation,
)

# Sampler noise when ``noise_level`` is null: DDIM eta = 1 (the DDPM step D3PO and DDPO use);
# Flow-GRPO's a = 0.7 for the flow SDE.
DEFAULT_NOISE_LEVEL = {"sd": 1.0, "sdxl": 1.0, "flux": 0.7, "sd3": 0.7}


# --- helpers shared with the GRPO trainer ------------------------------------------------------


def check_reward_spec(spec: Any, key: str) -> Any:
    """Config-time check that a reward spec names a registered reward with valid options."""
    if spec is None:
        return None
    from diffalign.rewards import parse_reward_spec

    try:
        parse_reward_spec(spec)
    except UserError as err:
        raise UserError(f"config error: {key}: {err}") from None
    return spec


def sampling_conditioning(
    policy: DiffusionPolicy, prompts: list[str], guidance_scale: float, negative_prompt: str | None,
    height: int | None = None, width: int | None = None,
) -> Conditioning:
    """Encode ``prompts`` for sampling: with an unconditional branch (the negative prompt, or
    "") when classifier-free guidance is on (``guidance_scale != 1``; FLUX: true CFG)."""
    height = height or policy.default_resolution()
    width = width or policy.default_resolution()
    if guidance_scale == 1.0:
        return policy.encode_prompts(prompts, height=height, width=width)
    negatives = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    return policy.encode_prompts(prompts, negatives, with_uncond=True, height=height, width=width)


def train_step_indices(num_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """The sampler steps to train on: all of them for fraction 1, else a random subset of
    ``max(1, int(fraction * num_steps))`` steps (sorted; DDPO's count), drawn with ``generator``."""
    count = max(1, min(num_steps, int(fraction * num_steps + 1e-9)))
    if count == num_steps:
        return list(range(num_steps))
    return sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())


def preference_from_scores(scores: Tensor, negative: bool = False) -> tuple[Tensor, Tensor]:
    """Preferences of pairs from reward scores [B, 2]: the higher score wins.

    Returns (winner [B] long in {0, 1}, valid [B] bool); ties are invalid (skipped). With
    ``negative`` (Diffusion-NPO) the lower score wins.
    """
    winner = (scores[:, 1] > scores[:, 0]).long()
    valid = scores[:, 0] != scores[:, 1]
    if negative:
        winner = 1 - winner
    return winner, valid


def pair_log_probs(logp: Tensor, winner: Tensor) -> tuple[Tensor, Tensor]:
    """Split log-probs [B, 2] (both chains of each pair) into (winner [B], loser [B])."""
    rows = torch.arange(logp.shape[0], device=logp.device)
    winner = winner.to(logp.device)
    return logp[rows, winner], logp[rows, 1 - winner]


# --- config ----------------------------------------------------------------------------------


class D3POSettings(BaseModel):
    """The D3PO objective, its sampler and where the preferences come from."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict | None = Field(
        None, description="AI feedback: a registry reward spec; of the two images the higher score wins (ties skipped)."
    )
    labels: str | None = Field(
        None, description="Human feedback: labels.jsonl written by `diffalign sample` and filled in by a person."
    )
    prompts: list[str] | str = Field(
        default_factory=lambda: list(BUILTIN_PROMPTS), description="Training prompts: a list or a text file (one per line)."
    )
    beta: float = Field(0.1, gt=0, description="Inverse temperature beta of the per-step DPO loss (paper: 0.1).")
    eps: float = Field(0.1, gt=0, lt=1, description="The ratio exp(logp - logp_ref) is clamped to [1 - eps, 1 + eps] (paper: 0.1).")
    timestep_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the sampler steps trained per pair (a random subset); 1 = every step."
    )
    num_steps: int = Field(
        20, ge=1, description="Sampler steps per chain (paper: 20). With labels, the sampler settings recorded "
        "by `diffalign sample` are used instead of num_steps, guidance_scale, negative_prompt and noise_level."
    )
    guidance_scale: float | None = Field(None, ge=0, description="CFG scale while sampling; null = the family default.")
    negative_prompt: str | None = Field(None, description="Negative prompt of the CFG branch (FLUX: true CFG); null = ''.")
    noise_level: float | None = Field(
        None, gt=0, description="DDIM eta (SD/SDXL) or flow-SDE a (FLUX); null = 1.0 (SD/SDXL), 0.7 (FLUX)."
    )
    negative: bool = Field(False, description="Diffusion-NPO: invert the preference to train a negative LoRA.")

    @field_validator("reward")
    @classmethod
    def _known_reward(cls, value: Any) -> Any:
        return check_reward_spec(value, "d3po.reward")

    @model_validator(mode="after")
    def _one_feedback_source(self) -> "D3POSettings":
        if (self.reward is None) == (self.labels is None):
            got = "both" if self.reward is not None else "neither"
            raise UserError(
                f"config error: d3po: set exactly one of d3po.reward (AI feedback, e.g. reward: aesthetic) and "
                f"d3po.labels (a labels.jsonl from `diffalign sample`); got {got}"
            )
        return self


class D3POConfig(BaseRunConfig):
    batch_unit: ClassVar[str] = "pairs"
    method: Literal["d3po"] = "d3po"
    d3po: D3POSettings = Field(..., description="The D3PO objective and its feedback.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")


register_method("d3po", D3POConfig, "diffalign.trainers.d3po:D3POTrainer")


# --- trainer ---------------------------------------------------------------------------------


class D3POTrainer:
    """``D3POTrainer(config).train()`` -> the directory of the final LoRA."""

    def __init__(self, config: D3POConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite

    def guidance(self, policy: DiffusionPolicy) -> float:
        g = self.cfg.d3po.guidance_scale
        return DEFAULT_GUIDANCE[policy.family] if g is None else g

    def noise_level(self, policy: DiffusionPolicy) -> float:
        a = self.cfg.d3po.noise_level
        return DEFAULT_NOISE_LEVEL[policy.family] if a is None else a

    # --- 1. sample ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_pairs(self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator) -> Trajectory:
        """Two chains per prompt from one starting noise: a trajectory of 2B chains ordered
        (p0 a, p0 b, p1 a, p1 b, ...), with decoded images."""
        cfg = self.cfg.d3po
        size = policy.default_resolution()
        guidance = self.guidance(policy)
        cond = sampling_conditioning(policy, prompts, guidance, cfg.negative_prompt).repeat_interleave(2)
        latents = policy.initial_noise(2 * len(prompts), size, size, generator, group_size=2)
        return policy.sample(cond, cfg.num_steps, guidance_scale=guidance, noise_level=self.noise_level(policy),
                             generator=generator, latents=latents)

    # --- 4. update ------------------------------------------------------------------------------

    def d3po_step(
        self, policy: DiffusionPolicy, trajectory: Trajectory, winner: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """D3PO loss and metrics at sampler step ``step`` for the pairs of ``trajectory`` (2B
        chains, pairs adjacent) with preferences ``winner`` [B]; gradients flow into the LoRA."""
        cfg = self.cfg.d3po
        logp = policy.log_prob(trajectory, step).view(-1, 2)
        with torch.no_grad(), policy.reference():
            ref_logp = policy.log_prob(trajectory, step).view(-1, 2)
        logp_w, logp_l = pair_log_probs(logp, winner)
        ref_w, ref_l = pair_log_probs(ref_logp, winner)
        return d3po_loss(logp_w, logp_l, ref_w, ref_l, cfg.beta, cfg.eps)

    def update_on_pairs(
        self, run: Run, policy: DiffusionPolicy, trajectory: Trajectory, winner: Tensor, steps: list[int], weight: float
    ) -> dict[str, Tensor]:
        """Backward the D3PO loss of every step in ``steps`` (each scaled by ``weight / len(steps)``);
        returns the metrics averaged over the steps."""
        metrics: dict[str, Tensor] = {}
        for step in steps:
            with run.accelerator.autocast():
                loss, micro = self.d3po_step(policy, trajectory, winner, step)
            run.backward(loss * weight / len(steps))
            for key, value in micro.items():
                metrics[key] = metrics.get(key, 0.0) + value / len(steps)
        return metrics

    def evaluate(self, policy: DiffusionPolicy, reward) -> dict[str, float]:
        """The mean reward of fixed samples (if ``eval.reward``)."""
        return {} if reward is None else {f"eval/{reward.name}": evaluate_reward(policy, reward, self.cfg.eval)}

    # --- the loop ---------------------------------------------------------------------------------

    def train(self):
        cfg = self.cfg
        d = cfg.d3po
        run = Run(cfg, overwrite=self.overwrite)
        policy, params = load_trainable_policy(cfg, run)
        self.policy = policy
        optimizer, lr_scheduler = build_optimization(cfg, params)
        rank = run.accelerator.process_index
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
        pick_generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank + 1)
        state = TrainingState(
            params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator, "picks": pick_generator},
        )
        if d.labels is not None:
            from diffalign.feedback import load_labelled_pairs

            with run.accelerator.main_process_first():
                feedback = load_labelled_pairs(d.labels, policy, model=cfg.model)
            sampler = EpochSampler(len(feedback), cfg.train.batch_size, cfg.seed, rank, run.num_processes)
            state.data_state = sampler.state
            num_items, source = len(feedback), f"human labels {d.labels} ({len(feedback)} labelled pairs)"
            steps_per_chain = feedback.num_steps
        else:
            prompts = load_prompts(d.prompts, key="d3po.prompts")
            reward = load_frozen_reward(d.reward, run.device)
            num_items, source = len(prompts), f"reward {reward.name} (higher wins, ties skipped)"
            steps_per_chain = d.num_steps
        start_step = run.restore(state)
        if d.labels is not None:
            sampler.load_state(state.data_state)
            state.data_state = sampler.state  # checkpoints save the sampler's live position
        trained_steps = max(1, min(steps_per_chain, int(d.timestep_fraction * steps_per_chain + 1e-9)))
        run.print(describe_batch(cfg, run.num_processes, num_items, items_per_sample=cfg.batch_unit))
        run.print(
            f"model {cfg.model} ({policy.family}), {policy.default_resolution()}px, {sum(p.numel() for p in params):,} "
            f"LoRA parameters; D3PO beta {d.beta}, eps {d.eps}, {trained_steps} of {steps_per_chain} sampler steps "
            f"per pair ({trained_steps} backward passes per micro-batch), feedback: {source}"
            + (", NEGATIVE (preference inverted)" if d.negative else "")
        )
        eval_reward = None if cfg.eval.reward is None else load_frozen_reward(cfg.eval.reward, run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, eval_reward))

        accumulation = cfg.train.gradient_accumulation_steps
        for step in range(start_step + 1, cfg.train.max_steps + 1):
            metrics: dict[str, float | Tensor] = {}
            for _ in range(accumulation):
                if d.labels is not None:
                    # 1. sample: the next labelled pairs (recorded chains) of this process's shard
                    _, indices = sampler.next_indices()
                    trajectory, winner = feedback.batch(policy, indices, negative=d.negative)
                    valid = torch.ones(len(indices), dtype=torch.bool)
                    micro = {}
                else:
                    # 1. sample: B prompts, two chains each from one starting noise
                    batch_prompts = draw_prompts(prompts, cfg.train.batch_size, pick_generator)
                    with run.accelerator.autocast():
                        trajectory = self.sample_pairs(policy, batch_prompts, generator)
                    # 2. score: the reward of both images of each pair
                    with torch.no_grad():
                        scores = reward(trajectory.images.float(), [p for p in batch_prompts for _ in (0, 1)])
                    scores = scores.float().view(-1, 2).cpu()
                    # 3. advantages: the preference of each pair (ties skipped)
                    winner, valid = preference_from_scores(scores, d.negative)
                    micro = {"reward": scores.mean(), "reward_std": scores.std(), "tie_frac": 1.0 - valid.float().mean()}
                # 4. update: the per-step DPO loss on the trained sampler steps of each valid pair
                index = valid.nonzero().flatten()
                micro["pairs"] = float(len(index))
                if len(index):
                    chains = torch.stack([2 * index, 2 * index + 1], dim=1).flatten()
                    steps = train_step_indices(trajectory.num_steps, d.timestep_fraction, pick_generator)
                    weight = len(index) / len(valid) / accumulation
                    micro.update(self.update_on_pairs(run, policy, trajectory.select(chains), winner[index], steps, weight))
                for key, value in micro.items():
                    metrics[key] = metrics.get(key, 0.0) + value / accumulation
            end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                     evaluate=lambda: self.evaluate(policy, eval_reward))

        after = self.evaluate(policy, eval_reward)
        return finish_run(run, cfg, policy, before, after, {"negative": "true"} if d.negative else None)
