"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): direct preference optimisation of a
denoiser on (prompt, chosen image, rejected image) pairs.

For each pair the chosen (w) and rejected (l) latents get the same noise and timestep; the loss
compares how much the policy lowers the denoising error of w relative to l against the reference
(the same denoiser with the LoRA disabled):

    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l)),  loss = -log sigmoid(inside)

The target is the family's own: epsilon or v (SD/SDXL) or the flow velocity (FLUX).
``dpo.loss: sft`` trains the plain denoising loss on the winners instead. ``dpo.negative: true``
swaps winner and loser (Diffusion-NPO): the LoRA learns what people dislike, for use as the
negative branch of guidance.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffalign.config import BaseRunConfig, describe_batch, register_method
from diffalign.data import EpochSampler, PairBatch, Prefetcher, collate_pairs, open_preference_pairs, split_pairs
from diffalign.losses import diffusion_dpo_loss, per_sample_mse, sft_loss
from diffalign.run import Run, TrainingState
from diffalign.training import (
    EvalSettings,
    build_optimization,
    end_step,
    evaluate_reward,
    finish_run,
    load_frozen_reward,
    load_trainable_policy,
    log_start_evaluation,
)


class DPOSettings(BaseModel):
    """The Diffusion-DPO objective."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["sigmoid", "sft"] = Field("sigmoid", description="sigmoid = Diffusion-DPO; sft = denoising loss on the winners.")
    beta: float = Field(5000.0, gt=0, description="KL strength beta (paper: 5000 for SD1.5 and SDXL, with the 0.5 factor).")
    negative: bool = Field(False, description="Diffusion-NPO: swap winner and loser to train a negative LoRA.")
    empty_prompt_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of pairs trained with an empty prompt (keeps the unconditional branch aligned)."
    )
    timestep_sampling: Literal["logit_normal", "uniform"] = Field(
        "uniform", description="Flow models: how sigma is drawn (SD/SDXL always use uniform timesteps)."
    )


class PairDataSettings(BaseModel):
    """Where the preference pairs come from and how they are augmented."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        ..., description="builtin:brightness | builtin:shapes | a .jsonl manifest {prompt, chosen, rejected} | a local parquet/arrow "
        "folder or hub dataset id in the Pick-a-Pic schema (caption, jpg_0, jpg_1, label_0)."
    )
    split: str = Field("train", description="Dataset split (hub/local datasets).")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many pairs.")
    random_crop: bool = Field(False, description="Random instead of centre square crop (same crop for both images).")
    random_flip: bool = Field(True, description="Horizontal flip with p=0.5 (same flip for both images).")
    keep_ties: bool = Field(
        False, description="Keep Pick-a-Pic tie pairs (label_0 = 0.5), ordered as label_0 = 0 (jpg_1 chosen), as the "
        "Diffusion-NPO authors' code does for negative training; false drops them (Diffusion-DPO)."
    )
    eval_pairs: int = Field(
        0, ge=0, description="Hold out the last N pairs: preference accuracy on them is logged at start, "
        "every logging.sample_every steps and at the end."
    )
    num_workers: int = Field(
        2, ge=0, description="Threads that load (decode, crop, resize) the coming micro-batches while the step "
        "runs, one micro-batch each; 0 = load in the training loop."
    )
    cache: Literal["none", "memory", "disk"] = Field(
        "none", description="Encode every image (VAE posterior; with random_flip its mirror too) and every prompt "
        "once before training, then train from the cache: same losses, no VAE or text encoder per step. memory = "
        "in RAM on every process; disk = safetensors shards under data.cache_dir, reused by later runs and resumes "
        "with the same model, data, resolution and augmentation. Needs random_crop: false."
    )
    cache_dir: str | None = Field(None, description="Folder for data.cache=disk (default $DIFFALIGN_CACHE/latents).")

    @model_validator(mode="after")
    def _cache_needs_fixed_crops(self) -> PairDataSettings:
        if self.cache != "none" and self.random_crop:
            raise ValueError("data.cache needs data.random_crop: false (a random crop changes the pixels every epoch, "
                             "so they cannot be encoded once); or set data.cache: none")
        return self


class DiffusionDPOConfig(BaseRunConfig):
    batch_unit: ClassVar[str] = "pairs"
    method: Literal["diffusion_dpo"] = "diffusion_dpo"
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="The DPO objective.")
    data: PairDataSettings = Field(..., description="Preference pairs.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")

    @model_validator(mode="after")
    def _offload_needs_a_cache(self) -> DiffusionDPOConfig:
        if self.train.offload_frozen and self.data.cache == "none":
            raise ValueError("train.offload_frozen needs data.cache: memory or disk (without a cache the VAE and "
                             "text encoders run every step)")
        return self


register_method("diffusion_dpo", DiffusionDPOConfig, "diffalign.trainers.diffusion_dpo:DiffusionDPOTrainer")


class DiffusionDPOTrainer:
    """``DiffusionDPOTrainer(config).train()`` -> the directory of the final LoRA."""

    def __init__(self, config: DiffusionDPOConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite
        self.cache = None  # a diffalign.latent_cache.PairCache when data.cache is set

    def denoising_errors(
        self, policy, batch: PairBatch, generator: torch.Generator, reference: bool = True, winners_only: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Per-sample denoising errors [B] of winner and loser under the policy (and, with
        ``reference``, under the reference), with shared noise and timestep for each pair.
        ``winners_only`` (SFT training): only the policy's error on the winners, ``(err_w,)``."""
        cfg = self.cfg.dpo
        chosen, rejected = batch.chosen, batch.rejected
        sizes, crops = batch.original_sizes, batch.crops_top_left
        if cfg.negative:  # Diffusion-NPO: learn the preference reversed
            chosen, rejected = rejected, chosen
            half = len(batch.prompts)
            sizes, crops = sizes[half:] + sizes[:half], crops[half:] + crops[:half]
        prompts = [
            "" if float(torch.rand((), generator=generator)) < cfg.empty_prompt_fraction else p for p in batch.prompts
        ]
        pixels = torch.cat([chosen, rejected]).to(policy.device)
        with torch.no_grad():
            if batch.encoded:  # data.cache: VAE posteriors and stored prompt embeddings, the same RNG draw
                latents = policy.latents_from_posterior(pixels, generator)
                cond = self.cache.conditioning(prompts, policy.device)
            else:
                latents = policy.encode_images(pixels, generator)
                cond = policy.encode_prompts(prompts)
            cond = cond.repeat(2)  # winner and loser share the prompt
            size = latents.shape[-1] * policy.pipe.vae_scale_factor if batch.encoded else pixels.shape[-1]
            cond = policy.with_image_sizes(cond, size, size, sizes, crops)
        # Winner and loser share noise and timestep (paper, sec. 4).
        b = len(prompts)
        noise = torch.randn(latents[:b].shape, generator=generator).to(latents.device).repeat(2, 1, 1, 1)
        t = policy.training_timesteps(b, generator, cfg.timestep_sampling).repeat(2)
        x_t = policy.noise(latents, noise, t)
        target = policy.target(latents, noise, t)
        if winners_only:
            pred_w = policy.predict(x_t[:b], t[:b], cond.select(slice(0, b)))
            return (per_sample_mse(pred_w, target[:b]),)
        err_w, err_l = per_sample_mse(policy.predict(x_t, t, cond), target).chunk(2)
        if not reference:
            return err_w, err_l
        with torch.no_grad(), policy.reference():
            ref_err_w, ref_err_l = per_sample_mse(policy.predict(x_t, t, cond), target).chunk(2)
        return err_w, err_l, ref_err_w, ref_err_l

    def dpo_step(self, policy, batch: PairBatch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics of one micro-batch of pairs (gradients flow into the LoRA)."""
        if self.cfg.dpo.loss == "sft":
            return sft_loss(self.denoising_errors(policy, batch, generator, winners_only=True)[0])
        errors = self.denoising_errors(policy, batch, generator)
        return diffusion_dpo_loss(*errors, self.cfg.dpo.beta)

    @torch.no_grad()
    def evaluate_preferences(self, policy, eval_pairs, resolution: int, draws: int = 4) -> dict[str, float]:
        """On held-out pairs (no crop or flip randomness; fixed noise and timesteps):
        ``pref_acc`` = share of (pair, draw) where the policy denoises the preferred image
        better than the other, the DPO loss against the reference, and ``denoising_loss`` = the
        mean error on the preferred images (the SFT objective). The same for both ``dpo.loss``."""
        batch = collate_pairs(eval_pairs, range(len(eval_pairs)), resolution, self.cfg.seed, 0, False, False)
        generator = torch.Generator().manual_seed(self.cfg.seed + 104_729)
        wins, losses, denoising = [], [], []
        for _ in range(draws):
            err_w, err_l, ref_err_w, ref_err_l = self.denoising_errors(policy, batch, generator)
            wins.append((err_w < err_l).float())
            losses.append(diffusion_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, self.cfg.dpo.beta)[0])
            denoising.append(sft_loss(err_w)[0])
        return {
            "eval/pref_acc": torch.cat(wins).mean().item(),
            "eval/dpo_loss": torch.stack(losses).mean().item(),
            "eval/denoising_loss": torch.stack(denoising).mean().item(),
        }

    def train(self):
        cfg = self.cfg
        run = Run(cfg, overwrite=self.overwrite)
        policy, params = load_trainable_policy(cfg, run)
        self.policy = policy
        optimizer, lr_scheduler = build_optimization(cfg, params)
        with run.accelerator.main_process_first():
            pairs = open_preference_pairs(cfg.data.source, cfg.data.split, cfg.data.max_samples,
                                          keep_ties=cfg.data.keep_ties)
        pairs, eval_pairs = split_pairs(pairs, cfg.data.eval_pairs)
        sampler = EpochSampler(len(pairs), cfg.train.batch_size, cfg.seed, run.accelerator.process_index, run.accelerator.num_processes)
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * run.accelerator.process_index)
        state = TrainingState(
            params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator}, data_state=sampler.state,
        )
        start_step = run.restore(state)
        sampler.load_state(state.data_state)
        state.data_state = sampler.state  # checkpoints save the sampler's live position
        resolution = policy.default_resolution()
        run.print(describe_batch(cfg, run.accelerator.num_processes, len(pairs), items_per_sample=cfg.batch_unit))
        run.print(f"model {cfg.model} ({policy.family}, {policy.prediction_type}), {resolution}px, "
                  f"{sum(p.numel() for p in params):,} LoRA parameters, loss {cfg.dpo.loss}, beta {cfg.dpo.beta}")
        reward = self._eval_reward(run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, reward, eval_pairs, resolution))
        if cfg.data.cache != "none":
            from diffalign.latent_cache import load_pair_cache

            self.cache = load_pair_cache(run, policy, cfg, pairs, resolution)
            if cfg.train.offload_frozen:
                policy.offload_frozen()

        def load(key: tuple[int, tuple[int, ...]]) -> PairBatch:  # the same batch in any thread, at any time
            epoch, indices = key
            if self.cache is not None:
                return self.cache.batch(indices, cfg.seed, epoch, cfg.data.random_flip)
            return collate_pairs(pairs, indices, resolution, cfg.seed, epoch, cfg.data.random_crop, cfg.data.random_flip)

        with Prefetcher(load, cfg.data.num_workers) as loader:
            for step in range(start_step + 1, cfg.train.max_steps + 1):
                metrics: dict[str, float] = {}
                for _ in range(cfg.train.gradient_accumulation_steps):
                    # 1. sample: the next pairs of this process's shard (loaded ahead by the workers)
                    epoch, indices = sampler.next_indices()
                    batch = loader.get((epoch, tuple(indices)))
                    loader.schedule((e, tuple(i)) for e, i in sampler.peek(cfg.data.num_workers))
                    # 2. score: denoising errors of policy and reference on shared noise
                    with run.accelerator.autocast():
                        loss, micro = self.dpo_step(policy, batch, generator)
                    # 3. accumulate
                    run.backward(loss / cfg.train.gradient_accumulation_steps)
                    for key, value in micro.items():
                        metrics[key] = metrics.get(key, 0.0) + value / cfg.train.gradient_accumulation_steps
                # 4. update
                metrics["epoch"] = sampler.state["epoch"]
                end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                         evaluate=lambda: self.evaluate(policy, reward, eval_pairs, resolution))

        after = self.evaluate(policy, reward, eval_pairs, resolution)
        return finish_run(run, cfg, policy, before, after, {"negative": "true"} if cfg.dpo.negative else None)

    def evaluate(self, policy, reward, eval_pairs, resolution: int) -> dict[str, float]:
        """Held-out preference accuracy (if ``data.eval_pairs``) and the mean reward of fixed
        samples (if ``eval.reward``)."""
        with policy.frozen_on_device():  # train.offload_frozen: the held-out pairs are not cached
            metrics = self.evaluate_preferences(policy, eval_pairs, resolution) if eval_pairs is not None else {}
        if reward is not None:
            metrics[f"eval/{reward.name}"] = evaluate_reward(policy, reward, self.cfg.eval)
        return metrics

    def _eval_reward(self, device):
        return None if self.cfg.eval.reward is None else load_frozen_reward(self.cfg.eval.reward, device)
