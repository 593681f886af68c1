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
from diffalign.on_policy import OnPolicyCheck
from diffalign.losses import d3po_loss
from diffalign.pipelines.base import DiffusionPolicy, Trajectory
from diffalign.run import Run, TrainingState
from diffalign.training import (
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

# Shared with the GRPO trainer and `diffalign sample`; re-exported here for existing imports.
from diffalign.sampling import (  # noqa: F401
    DEFAULT_NOISE_LEVEL,
    check_reward_spec,
    guidance_or_default,
    noise_level_or_default,
    preference_from_scores,
    sample_pairs,
    sampling_conditioning,
    train_step_indices,
)


def pair_log_probs(logp: Tensor, winner: Tensor) -> tuple[Tensor, Tensor]:
    """Split log-probs [B, 2] (both chains of each pair) into (winner [B], loser [B])."""
    rows = torch.arange(logp.shape[0], device=logp.device)
    winner = winner.to(logp.device)
    return logp[rows, winner], logp[rows, 1 - winner]


# --- config ----------------------------------------------------------------------------------


class D3POSettings(BaseModel):
    """The D3PO objective, its sampler and where the preferences come from."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict | list[str | dict] | None = Field(
        None, description="AI feedback: a registry reward spec; of the two images the higher score wins (ties skipped). "
        "A list of specs: Pareto dominance over the rewards, as the official compare(): an image wins when it scores "
        "at least as high on every reward and higher on one; pairs where neither dominates are skipped."
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
        if isinstance(value, list):
            if not value:
                raise UserError("config error: d3po.reward: an empty list; give one reward spec or several")
            return [check_reward_spec(v, f"d3po.reward[{i}]") for i, v in enumerate(value)]
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
        return guidance_or_default(self.cfg.d3po.guidance_scale, policy.family)

    def noise_level(self, policy: DiffusionPolicy) -> float:
        return noise_level_or_default(self.cfg.d3po.noise_level, policy.family)

    # --- 1. sample ------------------------------------------------------------------------------

    def sample_pairs(self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator) -> Trajectory:
        """Two chains per prompt from one starting noise (see ``diffalign.sampling.sample_pairs``)."""
        d = self.cfg.d3po
        return sample_pairs(policy, prompts, generator, d.num_steps, self.guidance(policy), self.noise_level(policy),
                            d.negative_prompt)

    # --- 4. update ------------------------------------------------------------------------------

    on_policy_check = None  # diffalign.on_policy.OnPolicyCheck, set by train()

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
        loss, metrics = d3po_loss(logp_w, logp_l, ref_w, ref_l, cfg.beta, cfg.eps)
        if self.on_policy_check is not None:  # sampled by these weights unless the pairs are human-labelled
            metrics.update(self.on_policy_check(logp.flatten(), trajectory.log_probs[:, step], cfg.labels is None))
        return loss, metrics

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
        self.on_policy_check = OnPolicyCheck(run.weight_dtype, method="d3po")
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
                feedback = load_labelled_pairs(d.labels, policy, model=cfg.model, init_lora=cfg.init_lora)
            sampler = EpochSampler(len(feedback), cfg.train.batch_size, cfg.seed, rank, run.num_processes)
            state.data_state = sampler.state
            num_items, source = len(feedback), f"human labels {d.labels} ({len(feedback)} labelled pairs)"
            steps_per_chain = feedback.num_steps
        else:
            prompts = load_prompts(d.prompts, key="d3po.prompts")
            specs = d.reward if isinstance(d.reward, list) else [d.reward]
            rewards = [load_frozen_reward(spec, run.device) for spec in specs]
            rule = "higher wins, ties skipped" if len(rewards) == 1 else "Pareto dominance, non-dominated pairs skipped"
            num_items, source = len(prompts), f"reward {', '.join(r.name for r in rewards)} ({rule})"
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
                        pair_prompts = [p for p in batch_prompts for _ in (0, 1)]
                        scores = torch.stack([r(trajectory.images.float(), pair_prompts).float().cpu() for r in rewards], -1)
                    scores = scores.view(-1, 2, len(rewards))  # [B, 2, K]
                    # 3. advantages: the preference of each pair (ties / no dominance skipped)
                    winner, valid = preference_from_scores(scores, d.negative)
                    micro = {"reward": scores[..., 0].mean(), "reward_std": scores[..., 0].std(),
                             "tie_frac": 1.0 - valid.float().mean()}
                    if len(rewards) > 1:
                        micro.update({f"reward/{r.name}": scores[..., k].mean() for k, r in enumerate(rewards)})
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
