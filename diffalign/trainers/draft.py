"""DRaFT (Clark et al. 2023, arXiv 2309.17400): fine-tune the denoiser's LoRA by backpropagating
a differentiable reward through the sampling chain and the VAE decoder.

Each step samples ``train.batch_size`` prompts, runs the sampler with gradients through the last
K denoising steps (earlier steps under no_grad, each differentiable denoiser call
gradient-checkpointed), decodes with gradient, scores the images and descends on
``loss = -reward_scale * mean(r)``:

* **DRaFT-K** (``draft.k``, default 1; ``k: all`` = full backprop through every step).
* **Random truncation** (``draft.random_truncation``, AlignProp-style): each trajectory draws its own
  K uniformly from {1, ..., k}.
* **DRaFT-LV** (``draft.lv_samples: n``, K = 1): the final sample x0 is detached, re-noised n times
  to the sampler's last timestep and denoised by that one step with gradient; the n rewards are
  averaged (lower-variance gradient for the same backward cost).

Only differentiable rewards work (brightness, aesthetic, pickscore, ... or a composite of them);
asking for a non-differentiable one (jpeg_compressibility) is a config error before any model loads.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from diffalign.config import BaseRunConfig, describe_batch, register_method
from diffalign.data import BUILTIN_PROMPTS, load_prompts
from diffalign.errors import UserError
from diffalign.losses import draft_loss
from diffalign.pipelines.base import Conditioning, DiffusionPolicy
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


def check_differentiable_reward(spec: Any, key: str) -> Any:
    """Config-time check that the reward ``spec`` exists and is differentiable (no model is built)."""
    from diffalign.rewards import require_differentiable

    try:
        require_differentiable(spec, key)
    except UserError as err:
        raise UserError(f"config error: {key}: {err}") from None
    return spec


class DraftSettings(BaseModel):
    """The DRaFT objective and its sampler."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict = Field(
        ..., description="Differentiable reward spec (brightness, aesthetic, pickscore, hpsv2, clip, {composite: {...}})."
    )
    reward_scale: float = Field(1.0, gt=0, description="loss = -reward_scale * mean reward.")
    prompts: list[str] | str = Field(
        default_factory=lambda: list(BUILTIN_PROMPTS), description="Training prompts: a list or a text file (one per line)."
    )
    num_steps: int = Field(50, ge=1, description="Sampler steps T per image.")
    guidance_scale: float | None = Field(None, ge=0, description="CFG scale while sampling; null = the family default.")
    noise_level: float = Field(0.0, ge=0, description="DDIM eta (SD/SDXL) or flow-SDE a (FLUX); 0 = deterministic.")
    k: int | Literal["all"] = Field(1, description="Backpropagate through the last k steps (DRaFT-K); 'all' = every step.")
    random_truncation: bool = Field(False, description="Draw K per trajectory uniformly from 1..k (AlignProp).")
    lv_samples: int = Field(0, ge=0, description="DRaFT-LV: n re-noised copies of the final step (needs k=1); 0 = off.")
    checkpoint_steps: bool = Field(True, description="Gradient-checkpoint each differentiable denoiser call.")

    @field_validator("reward")
    @classmethod
    def _reward_is_differentiable(cls, value: Any) -> Any:
        return check_differentiable_reward(value, "draft.reward")

    @field_validator("k")
    @classmethod
    def _k_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise UserError(f"config error: draft.k: must be >= 1 or 'all', got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DraftSettings":
        if isinstance(self.k, int) and self.k > self.num_steps:
            raise UserError(
                f"config error: draft.k: {self.k} is more than draft.num_steps ({self.num_steps}); "
                "use k: all for backprop through every step"
            )
        if self.lv_samples and self.k != 1:
            raise UserError(
                f"config error: draft.lv_samples: DRaFT-LV differentiates only the last step and needs draft.k=1 "
                f"(got k={self.k}); set k: 1 or lv_samples: 0"
            )
        if self.lv_samples and self.random_truncation:
            raise UserError("config error: draft.random_truncation: not with draft.lv_samples (LV always uses K=1)")
        if self.random_truncation and self.k == 1:
            raise UserError(
                "config error: draft.random_truncation: draws K from 1..draft.k, so it needs k > 1 or k: all"
            )
        return self

    def max_grad_steps(self) -> int:
        """The largest K, in steps."""
        return self.num_steps if self.k == "all" else int(self.k)


class DraftConfig(BaseRunConfig):
    method: Literal["draft"] = "draft"
    draft: DraftSettings = Field(..., description="The DRaFT objective.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")


register_method("draft", DraftConfig, "diffalign.trainers.draft:DraftTrainer")


class DraftTrainer:
    """``DraftTrainer(config).train()`` -> the directory of the final LoRA."""

    def __init__(self, config: DraftConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite

    # --- pieces of one step -----------------------------------------------------------------

    def truncation_steps(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """K for each trajectory [B] (long): ``draft.k`` (all = T) or, with random truncation,
        uniform on {1, ..., k}."""
        cfg = self.cfg.draft
        k_max = cfg.max_grad_steps()
        if not cfg.random_truncation:
            return torch.full((batch_size,), k_max, dtype=torch.long)
        return torch.randint(1, k_max + 1, (batch_size,), generator=generator)

    def sample_with_grad(
        self, policy: DiffusionPolicy, cond: Conditioning, latents: Tensor, cutoffs: Tensor,
        guidance: float, generator: torch.Generator,
    ) -> Tensor:
        """Decoded images [B, 3, H, W] in [0, 1] with gradients through the last ``cutoffs[b]``
        steps of chain b (chains sharing a K are sampled together)."""
        cfg = self.cfg.draft
        images: list[Tensor | None] = [None] * len(cutoffs)
        for k in cutoffs.unique().tolist():
            index = (cutoffs == k).nonzero().flatten()
            grad_steps = -1 if k >= cfg.num_steps else int(k)
            trajectory = policy.sample(
                cond.select(index), cfg.num_steps, guidance_scale=guidance, noise_level=cfg.noise_level,
                generator=generator, latents=latents[index], grad_steps=grad_steps, checkpoint=cfg.checkpoint_steps,
            )
            for row, i in enumerate(index.tolist()):
                images[i] = trajectory.images[row]
        return torch.stack(images)

    def sample_lv(
        self, policy: DiffusionPolicy, cond: Conditioning, latents: Tensor, guidance: float, generator: torch.Generator,
    ) -> Tensor:
        """DRaFT-LV: images [B * n, 3, H, W] (the n copies of each sample in a row). The chain runs
        without gradient; its final latents x0 are re-noised n times to the last timestep t_1,
        ``x_t1 = noise(x0, eps_i, t_1)``, and denoised by the last step with gradient."""
        cfg = self.cfg.draft
        n = cfg.lv_samples
        with torch.no_grad():
            trajectory = policy.sample(
                cond, cfg.num_steps, guidance_scale=guidance, noise_level=cfg.noise_level,
                generator=generator, latents=latents, decode=False,
            )
        x0 = trajectory.final_latents.detach().repeat_interleave(n, dim=0)
        t_last, t_end = trajectory.timesteps[-1], trajectory.next_timesteps[-1]
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        x_t = policy.noise(x0, noise, t_last)
        cond_n = cond.repeat_interleave(n)
        model_out = policy.predict(x_t, t_last, cond_n, guidance, checkpoint=cfg.checkpoint_steps)
        x_end, _, _, _ = policy.step(
            model_out, x_t, t_last, t_end, cfg.noise_level, timesteps=trajectory.timesteps, generator=generator
        )
        return policy.decode(x_end)

    def sample_images(
        self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator
    ) -> tuple[Tensor, list[str], float]:
        """Images of one micro-batch with gradients to the LoRA: [B, 3, H, W] in [0, 1], or
        [B * n, ...] for DRaFT-LV, with the prompt of each image and the mean K used."""
        cfg = self.cfg.draft
        guidance = DEFAULT_GUIDANCE[policy.family] if cfg.guidance_scale is None else cfg.guidance_scale
        size = policy.default_resolution()
        cond = policy.encode_prompts(prompts, with_uncond=guidance != 1.0)
        latents = policy.initial_noise(len(prompts), size, size, generator)
        if cfg.lv_samples:
            images = self.sample_lv(policy, cond, latents, guidance, generator)
            return images, [p for p in prompts for _ in range(cfg.lv_samples)], 1.0
        cutoffs = self.truncation_steps(len(prompts), generator)
        images = self.sample_with_grad(policy, cond, latents, cutoffs, guidance, generator)
        return images, list(prompts), cutoffs.float().mean().item()

    # --- the loop -----------------------------------------------------------------------------

    def train(self):
        cfg = self.cfg
        run = Run(cfg, overwrite=self.overwrite)
        policy, params = load_trainable_policy(cfg, run)
        optimizer, lr_scheduler = build_optimization(cfg, params)
        prompts = load_prompts(cfg.draft.prompts, key="draft.prompts")
        reward = load_frozen_reward(cfg.draft.reward, run.device)
        rank = run.accelerator.process_index
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
        prompt_generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank + 1)
        state = TrainingState(
            params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator, "prompts": prompt_generator},
        )
        start_step = run.restore(state)
        d = cfg.draft
        variant = f"DRaFT-LV (n={d.lv_samples})" if d.lv_samples else (
            f"DRaFT-K, K ~ U{{1..{d.max_grad_steps()}}}" if d.random_truncation else f"DRaFT-K, K={d.k}")
        run.print(describe_batch(cfg, run.accelerator.num_processes, len(prompts), items_per_sample="prompts"))
        run.print(f"model {cfg.model} ({policy.family}, {policy.prediction_type}), {policy.default_resolution()}px, "
                  f"{sum(p.numel() for p in params):,} LoRA parameters; {variant} of T={d.num_steps} steps, "
                  f"reward {reward.name} x {d.reward_scale}, {max(d.lv_samples, 1)} decoded image(s) per prompt")
        eval_reward = None if cfg.eval.reward is None else load_frozen_reward(cfg.eval.reward, run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, eval_reward))

        accumulation = cfg.train.gradient_accumulation_steps
        for step in range(start_step + 1, cfg.train.max_steps + 1):
            metrics: dict[str, float] = {}
            for _ in range(accumulation):
                # 1. sample: prompts, then the chain with gradients through its last K steps
                batch_prompts = draw_prompts(prompts, cfg.train.batch_size, prompt_generator)
                with run.accelerator.autocast():
                    images, image_prompts, mean_k = self.sample_images(policy, batch_prompts, generator)
                    # 2. score: the differentiable reward of the decoded images ([B, n] for DRaFT-LV)
                    rewards = reward(images, image_prompts).view(len(batch_prompts), -1)
                # 3. advantages: none; the reward's own gradient is the signal, loss = -scale * r
                loss, micro = draft_loss(rewards, cfg.draft.reward_scale)
                micro["k"] = mean_k
                run.backward(loss / accumulation)
                for key, value in micro.items():
                    metrics[key] = metrics.get(key, 0.0) + value / accumulation
            # 4. update
            end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                     evaluate=lambda: self.evaluate(policy, eval_reward))

        return finish_run(run, cfg, policy, before, self.evaluate(policy, eval_reward))

    def evaluate(self, policy: DiffusionPolicy, reward) -> dict[str, float]:
        """Mean ``eval.reward`` of deterministic samples on the fixed eval prompts and seeds."""
        return {} if reward is None else {f"eval/{reward.name}": evaluate_reward(policy, reward, self.cfg.eval)}
