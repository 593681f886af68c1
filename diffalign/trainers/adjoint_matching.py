"""Adjoint Matching (Domingo-Enrich et al. 2024, arXiv 2409.08861): reward fine-tuning as
stochastic optimal control, by regressing the LoRA's control onto the lean adjoint.

Each step:

1. samples trajectories from the *fine-tuned* model with the memoryless noise schedule (flow
   models: sigma(t) = sqrt(2 (1 - t) / t), t = 1 at data, the flow SDE with a = sqrt(2); SD/SDXL:
   DDIM with eta = 1), without gradient;
2. scores the final latents x1 and takes the reward gradient through the VAE decoder;
3. solves the lean adjoint backwards from a(1) = -lambda * grad r(x1) by vector-Jacobian products
   through the *base* step (LoRA disabled): a_k = (d mean_k^base / d x)(x_k)^T a_{k+1};
4. at K random steps k of each trajectory regresses the control onto the adjoint:

       loss = mean_k || (mean_k^fine - mean_k^base) / std_k + std_k * a_{k+1} ||^2   (summed over C, H, W)

   averaged over batch x K as the official code does (``loss_reduction: sum`` sums over k instead).
   As in the official default, classifier-free guidance shapes only the sampling: the adjoint and
   the control are the unguided conditional drifts (``adjoint_guidance: true`` guides them too),
   and ``empty_prompt_fraction`` (0.2) of the batches use the empty prompt, which fine-tunes the
   unconditional branch that guidance uses.

   = sum_k dt_k ||u + sigma a||^2 with control u = (b_fine - b_base) / sigma, drift b = (mean - x)/dt
   and diffusion sigma = std / sqrt(dt) (see ``losses.adjoint_matching_loss``). The adjoint is taken
   at the step's landing point, a_{k+1}: the optimal Gaussian step tilts the base step by
   exp(V(x_{k+1})), i.e. shifts its mean by std^2 grad V, and a_{k+1} estimates -grad V(x_{k+1})
   (V = lambda r at the end), so the loss is zero exactly there; a_k would differ by O(dt).
   Steps with std = 0 (a deterministic DDIM end step) carry no control cost and are never drawn.

With lambda the optimum is p*(x) ∝ p_base(x) exp(lambda r(x)); ``loss_clip`` drops outlier
(sample, step) terms from the gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from diffalign.config import BaseRunConfig, describe_batch, register_method
from diffalign.data import BUILTIN_PROMPTS, load_prompts
from diffalign.errors import UserError
from diffalign.losses import adjoint_matching_loss
from diffalign.pipelines.adjoint import lean_adjoint, memoryless_noise_level, memoryless_sde_type
from diffalign.pipelines.base import DiffusionPolicy, Trajectory, sde_step_kwargs
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


class AdjointMatchingSettings(BaseModel):
    """The Adjoint Matching objective and its memoryless sampler."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict = Field(
        ..., description="Differentiable reward spec (brightness, aesthetic, pickscore, hpsv2, clip, {composite: {...}})."
    )
    reward_multiplier: float = Field(
        1.0, gt=0, description="lambda: the target is p_base * exp(lambda * r); a(1) = -lambda * grad r(x1)."
    )
    prompts: list[str] | str = Field(
        default_factory=lambda: list(BUILTIN_PROMPTS), description="Training prompts: a list or a text file (one per line)."
    )
    num_steps: int = Field(40, ge=2, description="Sampler steps T per trajectory (memoryless SDE / DDIM eta=1).")
    timesteps_per_trajectory: int = Field(
        10, ge=1, description="Steps of each trajectory drawn (without replacement) for the regression loss."
    )
    guidance_scale: float | None = Field(
        None, ge=0, description="CFG scale of the sampling; null = the family default. The adjoint and the control "
        "use it too only with adjoint_guidance."
    )
    adjoint_guidance: bool = Field(
        False, description="Also guide the lean adjoint (base drift) and the regressed control with guidance_scale. "
        "false (official default): guidance only in sampling; adjoint and control are the unguided conditional drifts."
    )
    empty_prompt_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of micro-batches that use the empty prompt throughout (sampling, adjoint, "
        "regression), so the unconditional branch that CFG uses is fine-tuned too (official: 0.2)."
    )
    loss_reduction: Literal["mean", "sum"] = Field(
        "mean", description="How the K regressed steps of a trajectory combine: mean over batch x K (official) or the "
        "sum over K of batch means (K times the gradient at the same learning rate)."
    )
    loss_clip: float | None = Field(
        None, gt=0, description="Per-sample, per-step loss clipping: terms above it give no gradient; null = off."
    )

    @field_validator("reward")
    @classmethod
    def _reward_is_differentiable(cls, value: Any) -> Any:
        from diffalign.rewards import require_differentiable

        try:
            require_differentiable(value, "adjoint_matching.reward")
        except UserError as err:
            raise UserError(f"config error: adjoint_matching.reward: {err}") from None
        return value

    @model_validator(mode="after")
    def _enough_steps(self) -> "AdjointMatchingSettings":
        if self.timesteps_per_trajectory > self.num_steps:
            raise UserError(
                f"config error: adjoint_matching.timesteps_per_trajectory: {self.timesteps_per_trajectory} is more "
                f"than adjoint_matching.num_steps ({self.num_steps}); lower it"
            )
        return self


class AdjointMatchingConfig(BaseRunConfig):
    method: Literal["adjoint_matching"] = "adjoint_matching"
    adjoint_matching: AdjointMatchingSettings = Field(..., description="The Adjoint Matching objective.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")


register_method("adjoint_matching", AdjointMatchingConfig, "diffalign.trainers.adjoint_matching:AdjointMatchingTrainer")


def terminal_adjoint(policy: DiffusionPolicy, reward, final_latents: Tensor, prompts: list[str], multiplier: float) -> tuple[Tensor, Tensor]:
    """a(1) = -lambda * grad_x r(decode(x)) at x = final_latents [B, C, h, w]; returns (a(1), r [B])."""
    x1 = final_latents.detach().float().requires_grad_(True)
    with torch.enable_grad():
        rewards = reward(policy.decode(x1), prompts)
        (grad,) = torch.autograd.grad(rewards.sum(), x1)
    return -multiplier * grad, rewards.detach()


def prompts_or_empty(prompts: list[str], fraction: float, generator: torch.Generator) -> list[str]:
    """``prompts``, or with probability ``fraction`` (one draw per batch) as many empty prompts:
    that batch trains the unconditional branch classifier-free guidance uses."""
    if float(torch.rand((), generator=generator)) < fraction:
        return [""] * len(prompts)
    return prompts


def loss_steps(trajectory: Trajectory, policy: DiffusionPolicy, count: int, generator: torch.Generator) -> list[int]:
    """``count`` distinct steps drawn uniformly among those with noise (std > 0), ascending."""
    candidates = []
    for k in range(trajectory.num_steps):
        if bool((step_std(policy, trajectory, k) > 0).all()):
            candidates.append(k)
    if not candidates:
        raise UserError("adjoint_matching: every sampler step is deterministic (std = 0); the memoryless schedule needs noise")
    order = torch.randperm(len(candidates), generator=generator)[: min(count, len(candidates))]
    return sorted(candidates[i] for i in order.tolist())


def step_std(policy: DiffusionPolicy, trajectory: Trajectory, k: int) -> Tensor:
    """The noise std of step k (it depends on the schedule only: zeros stand in for the model output)."""
    x = trajectory.latents[:1, k]
    _, _, _, std = policy.step(
        torch.zeros_like(x), x, trajectory.timesteps[k], trajectory.next_timesteps[k], trajectory.noise_level,
        timesteps=trajectory.timesteps, prev_sample=trajectory.latents[:1, k + 1], **sde_step_kwargs(trajectory.sde_type),
    )
    return torch.as_tensor(std)


class AdjointMatchingTrainer:
    """``AdjointMatchingTrainer(config).train()`` -> the directory of the final LoRA."""

    def __init__(self, config: AdjointMatchingConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite

    def train(self):
        cfg = self.cfg
        am = cfg.adjoint_matching
        run = Run(cfg, overwrite=self.overwrite)
        policy, params = load_trainable_policy(cfg, run)
        optimizer, lr_scheduler = build_optimization(cfg, params)
        prompts = load_prompts(am.prompts, key="adjoint_matching.prompts")
        reward = load_frozen_reward(am.reward, run.device)
        rank = run.accelerator.process_index
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
        prompt_generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank + 1)
        state = TrainingState(
            params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator, "prompts": prompt_generator},
        )
        start_step = run.restore(state)
        noise_level = memoryless_noise_level(policy.family)
        guidance = DEFAULT_GUIDANCE[policy.family] if am.guidance_scale is None else am.guidance_scale
        size = policy.default_resolution()
        run.print(describe_batch(cfg, run.accelerator.num_processes, len(prompts), items_per_sample="prompts"))
        run.print(f"model {cfg.model} ({policy.family}, {policy.prediction_type}), {size}px, "
                  f"{sum(p.numel() for p in params):,} LoRA parameters; memoryless sampler (noise level "
                  f"{noise_level:.4g}) with {am.num_steps} steps, guidance {guidance}; loss on "
                  f"{am.timesteps_per_trajectory} steps per trajectory; reward {reward.name}, lambda {am.reward_multiplier}")
        eval_reward = None if cfg.eval.reward is None else load_frozen_reward(cfg.eval.reward, run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, eval_reward))

        accumulation = cfg.train.gradient_accumulation_steps
        for step in range(start_step + 1, cfg.train.max_steps + 1):
            metrics: dict[str, float] = {}
            for _ in range(accumulation):
                # 1. sample: trajectories of the fine-tuned model, memoryless noise, no gradient
                batch_prompts = prompts_or_empty(
                    draw_prompts(prompts, cfg.train.batch_size, prompt_generator), am.empty_prompt_fraction, prompt_generator
                )
                with torch.no_grad(), run.accelerator.autocast():
                    cond = policy.encode_prompts(batch_prompts, with_uncond=guidance != 1.0)
                    trajectory = policy.sample(
                        cond, am.num_steps, guidance_scale=guidance, noise_level=noise_level,
                        generator=generator, latents=policy.initial_noise(len(batch_prompts), size, size, generator),
                        decode=False, sde_type=memoryless_sde_type(policy.family),
                    )
                # 2. score: the reward and its gradient at x1, through the decoder
                with run.accelerator.autocast():
                    a_final, rewards = terminal_adjoint(policy, reward, trajectory.final_latents, batch_prompts, am.reward_multiplier)
                # 3. advantages: the lean adjoint, solved backwards through the base model (unguided
                # unless adjoint_guidance: the guidance shaped the samples only)
                regressed = trajectory if am.adjoint_guidance else dataclasses.replace(trajectory, guidance_scale=1.0)
                with run.accelerator.autocast():
                    adjoints, base_means = lean_adjoint(policy, regressed, a_final)
                # 4. update: regress the control at a few steps (one backward per step), then step
                micro = {"loss": 0.0, "control_norm": 0.0, "target_norm": 0.0, "clip_frac": 0.0}
                steps = loss_steps(trajectory, policy, am.timesteps_per_trajectory, generator)
                per_step = 1.0 / len(steps) if am.loss_reduction == "mean" else 1.0
                for k in steps:
                    with run.accelerator.autocast():
                        _, fine_mean, std = policy.step_distribution(regressed, k)
                        loss, terms = adjoint_matching_loss(fine_mean, base_means[:, k], std, adjoints[:, k + 1], am.loss_clip)
                    run.backward(loss * per_step / accumulation)
                    for key in micro:
                        micro[key] += terms[key] * (1.0 / len(steps) if key == "clip_frac" else per_step)
                micro["reward"] = rewards.mean()
                micro["adjoint_norm_x0"] = adjoints[:, 0].flatten(1).norm(dim=1).mean()
                for key, value in micro.items():
                    metrics[key] = metrics.get(key, 0.0) + value / accumulation
            end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                     evaluate=lambda: self.evaluate(policy, eval_reward))

        return finish_run(run, cfg, policy, before, self.evaluate(policy, eval_reward))

    def evaluate(self, policy: DiffusionPolicy, reward) -> dict[str, float]:
        """Mean ``eval.reward`` of deterministic samples on the fixed eval prompts and seeds."""
        return {} if reward is None else {f"eval/{reward.name}": evaluate_reward(policy, reward, self.cfg.eval)}
