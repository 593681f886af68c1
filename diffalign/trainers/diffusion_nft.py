"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117; reference
code NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` and ``config/nft.py`` @ 24af555).

Each round:

1. **sample** G images per prompt from the *old* policy with a deterministic solver (the
   reference's 2nd-order multistep DPM-Solver, ``solver: dpm2``; or the policy's own ODE / DDIM
   eta 0 sampler, ``solver: euler``), CFG-free by default, keeping only the clean latents x0 (no
   log-probabilities are needed);
2. **score** them with any registry reward;
3. **advantages**: normalised per prompt over the whole round, every process's groups of one
   prompt pooled (the reference's per-prompt stat tracking; by the std of the whole round with
   ``global_std``), mapped to the optimality probability
   r = clip(A / adv_clip_max / 2 + 1/2, 0, 1);
4. **update**: for each image, on a random ``timestep_fraction`` of the sampler's timesteps,
   fresh noise gives x_t = (1 - t) x0 + t noise (the family's forward process); the old and the
   trained model predict there, and :func:`diffalign.losses.diffusion_nft_loss` regresses the
   implicit positive and negative policies v± onto x0 with the adaptive weight, plus
   ``kl_beta`` ||v_theta - v_ref||^2 to the reference (LoRA off).

The **old policy** is a second LoRA adapter (``"old"``) on the same denoiser: peft holds both,
and the sampler switches to it (``adapter_only``); nothing is copied. At the start of
every round it moves toward the trained adapter, old <- d old + (1 - d) theta, with the
reference's decay schedule d(step) (:func:`old_decay`); d(0) = 0, so the first round samples
from the trained adapter itself, as the reference's initial copy does. The old adapter is part
of every checkpoint (``TrainingState.extra_tensors``), and a checkpoint taken inside a round
keeps the round's x0, advantages, shuffle and position (``process_tensors``), so a resumed run
matches a straight one bit for bit.

**Families.** The paper and the reference are flow matching (SD3, FLUX): x0 = x_t - t v. The
maths carries over to SD/SDXL unchanged because their x0 prediction is affine in the network
output for epsilon and v-prediction as well (x0 = (x_t - s eps) / a, x0 = a x_t - s v), so the
combinations v± of the outputs are the same combinations of the x0 predictions; the loss is
written in x0 space for every family. ``solver: dpm2`` is the flow-model solver; SD/SDXL sample
with ``euler`` (DDIM eta 0). The reference's hyper-parameters (beta, adaptive weight, loss
scale) were tuned on SD3.5-M only.

Batch arithmetic as for GRPO: a round is ``prompts_per_round`` groups of ``group_size`` images
per process; ``train.batch_size`` images per micro-batch, ``train.gradient_accumulation_steps``
micro-batches per optimizer step, each micro-batch trained on every one of its chosen timesteps.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from diffalign import lora
from diffalign.config import BaseRunConfig, register_method
from diffalign.data import BUILTIN_PROMPTS, load_prompts
from diffalign.errors import UserError
from diffalign.losses import diffusion_nft_loss, per_sample_mse
from diffalign.pipelines.base import Conditioning, DiffusionPolicy, adapter_only
from diffalign.run import Run, TrainingState
from diffalign.trainers.d3po import check_reward_spec, sampling_conditioning
from diffalign.trainers.npo import forward_coefficients, predicted_x0
from diffalign.trainers.grpo_maths import per_prompt_advantages
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

OLD_ADAPTER = "old"

# The reference's decay schedules of the old adapter (train_nft_sd3.py ``return_decay``):
# decay_type -> (flat steps, rise per step, cap). d = 0 before ``flat``, then min((step - flat) * rise, cap).
OLD_DECAY_SCHEDULES: dict[int, tuple[int, float, float]] = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


# --- the old adapter (pure helpers) -------------------------------------------------------------


def old_decay(step: int, schedule: int) -> float:
    """The EMA decay d of the old adapter after ``step`` optimizer steps (reference schedules:
    0 = always copy the trained adapter; 1 = 0.001 per step up to 0.5; 2 = 0 for 75 steps, then
    0.0075 per step up to 0.999)."""
    flat, rise, cap = OLD_DECAY_SCHEDULES[schedule]
    return 0.0 if step < flat else min((step - flat) * rise, cap)


@torch.no_grad()
def ema_toward(old: dict[str, Tensor], new: dict[str, Tensor], decay: float) -> None:
    """old <- decay * old + (1 - decay) * new, in place, key by key (fp32 LoRA weights)."""
    for name, tensor in old.items():
        tensor.copy_(tensor * decay + new[name].detach() * (1.0 - decay))


def add_old_adapter(denoiser: torch.nn.Module, adapter_name: str = OLD_ADAPTER) -> dict[str, torch.nn.Parameter]:
    """Add a second LoRA adapter with the trained adapter's config, holding a copy of its weights
    (fp32, frozen); the trained adapter stays the active, trainable one. Returns its parameters
    (peft names, the same keys as the trained adapter's)."""
    trained = lora.lora_parameters(denoiser)
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        denoiser.add_adapter(copy.deepcopy(denoiser.peft_config["default"]), adapter_name=adapter_name)
    denoiser.set_adapter("default")
    for param, flag in flags:
        param.requires_grad_(flag)
    old = lora.lora_parameters(denoiser, adapter_name)
    with torch.no_grad():
        for name, param in old.items():
            param.data = trained[name].detach().clone().float()
            param.requires_grad_(False)
    return old


# --- the reference's sampler: multistep DPM-Solver++ (2M) for flow models -------------------------


@torch.no_grad()
def flow_dpm2_sample(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic 2nd-order multistep DPM-Solver++ on a rectified flow x_s = (1 - s) x0 + s n.

    velocity(x [B, ...], t [] = 1000 * sigma) -> v [B, ...]; x: starting noise (fp32); sigmas:
    [T + 1] from 1 down to 0. With x0_i = x_i - s_i v_i, alpha = 1 - s, lambda = log(alpha / s)
    and h = lambda_next - lambda_i, each step is (DPM-Solver++, data prediction)

        x_next = (s_next / s_i) x_i - alpha_next (e^-h - 1) D,   D = x0_i + (x0_i - x0_prev) / (2 r),
        r = (lambda_i - lambda_prev) / h

    with first order (D = x0_i, the DDIM = Euler step) on the first and the last step, as the
    reference solver does. Coefficients in fp64.
    """
    sig = sigmas.double().cpu()
    lam = torch.log((1.0 - sig).clamp(min=0)) - torch.log(sig)  # -inf at sigma = 1, +inf at 0
    x = x.float()
    x0_prev = None
    last = len(sig) - 2
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = x - float(s) * velocity(x, sig[i].float() * 1000.0).float()
        if i == 0 or i == last:
            x = x0 + float(s_next / s) * (x - x0)  # first order: DDIM / Euler
        else:
            h = lam[i + 1] - lam[i]
            r = (lam[i] - lam[i - 1]) / h
            d = x0 + (x0 - x0_prev) * float(1.0 / (2.0 * r))
            x = float(s_next / s) * x - float((1.0 - s_next) * torch.expm1(-h)) * d
        x0_prev = x0
    return x


# --- config ----------------------------------------------------------------------------------------


class DiffusionNFTSettings(BaseModel):
    """Online sampling from the old adapter, rewards, and the negative-aware update."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict = Field(..., description="Registry reward spec (any pointwise score; need not be differentiable).")
    prompts: list[str] | str = Field(
        default_factory=lambda: list(BUILTIN_PROMPTS), description="Training prompts: a list or a text file (one per line)."
    )
    group_size: int = Field(24, ge=2, description="G images per prompt per round (reference: 24).")
    prompts_per_round: int = Field(1, ge=1, description="Prompt groups sampled per process per round.")
    sample_batch_size: int | None = Field(None, ge=1, description="Chains per sampler call; null = the whole round at once.")
    same_noise: bool = Field(False, description="All images of a group start from one noise (reference: independent).")
    num_steps: int = Field(10, ge=2, description="Sampler steps T per image; the training timesteps are drawn from them.")
    solver: Literal["dpm2", "euler"] = Field(
        "dpm2", description="Deterministic sampler: dpm2 = 2nd-order multistep DPM-Solver++ (the reference; flow "
        "models only), euler = the policy's ODE sampler (flow Euler, SD/SDXL DDIM eta 0)."
    )
    guidance_scale: float = Field(1.0, ge=0, description="CFG scale while sampling (reference: 1, CFG-free); training is always CFG-free.")
    negative_prompt: str | None = Field(None, description="Negative prompt of the CFG branch when guidance_scale != 1; null = ''.")
    beta: float = Field(1.0, gt=0, description="Guidance strength of the implicit policies v± (reference: 1; 0.1 for OCR).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages clipped to +-adv_clip_max, then r = A / adv_clip_max / 2 + 1/2.")
    global_std: bool = Field(True, description="Normalise advantages by the std of the whole round (reference) instead of each group's.")
    kl_beta: float = Field(1e-4, ge=0, description="Weight of ||v_theta - v_ref||^2 to the reference (LoRA off); 0 = no reference passes.")
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="Share of the T sampler timesteps trained per image (random, reference: int(0.99 T))."
    )
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each round's samples.")
    old_decay: Literal[0, 1, 2] = Field(
        1, description="Decay schedule of the old adapter's EMA (reference decay_type): 0 = copy the trained adapter "
        "each round; 1 = 0.001 x step up to 0.5; 2 = 0 for 75 steps, then 0.0075 x (step - 75) up to 0.999."
    )


class DiffusionNFTConfig(BaseRunConfig):
    batch_unit: ClassVar[str] = "images"
    method: Literal["diffusion_nft"] = "diffusion_nft"
    nft: DiffusionNFTSettings = Field(..., description="DiffusionNFT sampling, rewards and update.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Reward evaluation at start/end.")

    @model_validator(mode="after")
    def _round(self) -> "DiffusionNFTConfig":
        check_reward_spec(self.nft.reward, "nft.reward")
        round_size = self.nft.prompts_per_round * self.nft.group_size
        per_step = self.train.batch_size * self.train.gradient_accumulation_steps
        if round_size % per_step:
            raise UserError(
                f"config error: nft.prompts_per_round x nft.group_size = {round_size} images per round is not a "
                f"multiple of train.batch_size x train.gradient_accumulation_steps = {per_step}; change one of them"
            )
        return self


register_method("diffusion_nft", DiffusionNFTConfig, "diffalign.trainers.diffusion_nft:DiffusionNFTTrainer")


# --- trainer -----------------------------------------------------------------------------------------


class DiffusionNFTTrainer:
    """``DiffusionNFTTrainer(config).train()`` -> the directory of the final LoRA."""

    def __init__(self, config: DiffusionNFTConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite
        self.settings = config.nft

    def train_count(self) -> int:
        """Training timesteps per image: max(1, int(timestep_fraction * T))."""
        s = self.settings
        return max(1, min(s.num_steps, int(s.timestep_fraction * s.num_steps + 1e-9)))

    # --- 1. sample -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_round(self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x0 [N*G, C, h, w] fp32, images [N*G, 3, H, W] in [0, 1]) sampled from the old adapter."""
        s = self.settings
        size = policy.default_resolution()
        cond = sampling_conditioning(policy, prompts, s.guidance_scale, s.negative_prompt).repeat_interleave(s.group_size)
        total = len(prompts) * s.group_size
        noise = policy.initial_noise(total, size, size, generator, group_size=s.group_size if s.same_noise else 1)
        chunk = s.sample_batch_size or total
        latents = []
        with adapter_only(policy.denoiser, OLD_ADAPTER):
            for i in range(0, total, chunk):
                part = cond.select(slice(i, i + chunk))
                if s.solver == "dpm2":
                    timesteps, next_timesteps = policy.schedule(s.num_steps, size, size)
                    sigmas = torch.cat([timesteps, next_timesteps[-1:]]) / 1000.0
                    velocity = lambda x, t, c=part: policy.predict(x, t.to(x.device), c, s.guidance_scale)  # noqa: E731
                    latents.append(flow_dpm2_sample(velocity, noise[i : i + chunk], sigmas))
                else:
                    latents.append(policy.sample(part, s.num_steps, guidance_scale=s.guidance_scale, noise_level=0.0,
                                                 latents=noise[i : i + chunk], decode=False).final_latents)
        x0 = torch.cat(latents)
        return x0, policy.decode(x0)

    # --- 4. update -----------------------------------------------------------------------------

    def nft_step(
        self, policy: DiffusionPolicy, x0: Tensor, cond: Conditioning, t: Tensor, noise: Tensor, advantages: Tensor
    ) -> tuple[Tensor, dict]:
        """Loss and metrics at timesteps t [B] with the given noise; gradients flow into the trained
        adapter. Predictions are CFG-free (the conditional branch), as in the reference."""
        s = self.settings
        x_t = policy.noise(x0, noise, t)
        a, sd, c, d = forward_coefficients(policy, t)
        with torch.no_grad(), adapter_only(policy.denoiser, OLD_ADAPTER):
            out_old = policy.predict(x_t, t, cond)
        out = policy.predict(x_t, t, cond)
        kl = None
        if s.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                out_ref = policy.predict(x_t, t, cond)
            kl = per_sample_mse(out, out_ref)
        x0_theta = predicted_x0(out, x_t, a, sd, c, d)
        x0_old = predicted_x0(out_old, x_t, a, sd, c, d)
        return diffusion_nft_loss(x0_theta, x0_old, x0, advantages, s.beta, s.adv_clip_max, kl, s.kl_beta)

    def evaluate(self, policy: DiffusionPolicy, reward) -> dict[str, float]:
        return {} if reward is None else {f"eval/{reward.name}": evaluate_reward(policy, reward, self.cfg.eval)}

    # --- the loop --------------------------------------------------------------------------------

    def train(self):
        cfg, s = self.cfg, self.settings
        run = Run(cfg, overwrite=self.overwrite)
        policy, params = load_trainable_policy(cfg, run)
        if s.solver == "dpm2" and policy.prediction_type != "flow":
            raise UserError(
                f"nft.solver: dpm2 is the flow-model solver (FLUX, SD3); {cfg.model} is {policy.family} "
                f"({policy.prediction_type}): set nft.solver=euler (DDIM eta 0)"
            )
        old = add_old_adapter(policy.denoiser)
        trained = lora.lora_parameters(policy.denoiser)
        optimizer, lr_scheduler = build_optimization(cfg, params)
        prompts = load_prompts(s.prompts, key="nft.prompts")
        reward = load_frozen_reward(s.reward, run.device)
        rank = run.accelerator.process_index
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
        pick_generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank + 1)
        state = TrainingState(
            params=trained, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator, "picks": pick_generator},
            extra_tensors={f"{OLD_ADAPTER}.{name}": param for name, param in old.items()},
        )
        start_step = run.restore(state)

        round_size = s.prompts_per_round * s.group_size
        micro, accumulation = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        steps_per_round = s.num_inner_epochs * round_size // (micro * accumulation)
        n_train, n = self.train_count(), run.num_processes
        size = policy.default_resolution()
        timesteps, _ = policy.schedule(s.num_steps, size, size)
        run.print(
            f"round: {s.prompts_per_round} prompts x {s.group_size} images per process x {n} processes = "
            f"{round_size * n} images per round, sampled from the old adapter ({s.solver}, {s.num_steps} steps, "
            f"CFG {s.guidance_scale})\n"
            f"update: {s.num_inner_epochs} inner epoch(s) x {round_size // micro} micro-batches of {micro} images x "
            f"{n_train} timesteps -> {steps_per_round} optimizer steps per round "
            f"({micro * accumulation * n} images per optimizer step)\n"
            f"training: {cfg.train.max_steps} optimizer steps = {cfg.train.max_steps / steps_per_round:g} rounds"
        )
        run.print(
            f"model {cfg.model} ({policy.family}, {policy.prediction_type}), {size}px, {sum(p.numel() for p in params):,} "
            f"LoRA parameters; diffusion_nft: reward {reward.name}, beta {s.beta}, adv_clip_max {s.adv_clip_max}, "
            f"kl_beta {s.kl_beta}, old adapter decay schedule {s.old_decay}"
        )
        eval_reward = None if cfg.eval.reward is None else load_frozen_reward(cfg.eval.reward, run.device)
        before = log_start_evaluation(run, start_step, lambda: self.evaluate(policy, eval_reward))

        step = start_step
        tensors = state.process_tensors
        resumed = dict(tensors) if tensors else None
        while step < cfg.train.max_steps:
            if resumed is not None:  # a checkpoint taken inside a round: its samples and shuffle carry on
                picks, x0, advantages = resumed["round.picks"], resumed["round.x0"].to(run.device), resumed["round.advantages"]
                round_metrics = {k.removeprefix("round.metric."): v.item() for k, v in resumed.items() if k.startswith("round.metric.")}
                order, (first_epoch, first_start) = resumed["round.order"], resumed["round.position"].tolist()
                if x0.shape[0] != round_size or int(picks.max()) >= len(prompts):
                    raise UserError("the checkpoint was taken inside a round sampled with other nft.prompts_per_round, "
                                    "group_size or prompts; resume with the settings it was saved with")
                resumed = None
            else:
                # the old adapter moves toward the trained one (d(0) = 0: the first round copies it)
                ema_toward(old, trained, old_decay(step, s.old_decay))
                # 1. sample: x0 from the old adapter, deterministically
                picks = torch.randint(len(prompts), (s.prompts_per_round,), generator=pick_generator)
                with run.accelerator.autocast():
                    x0, images = self.sample_round(policy, [prompts[i] for i in picks.tolist()], generator)
                # 2. score
                group_prompts = [prompts[i] for i in picks.tolist() for _ in range(s.group_size)]
                with torch.no_grad():
                    rewards = reward(images.float(), group_prompts).float().cpu().view(s.prompts_per_round, s.group_size)
                round_metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                                 "zero_std_frac": (rewards.std(dim=1) == 0).float().mean().item()}
                # 3. advantages: per prompt over the whole gathered round (the reference's stat tracker;
                #    the std of the whole round with global_std)
                all_rewards = run.accelerator.gather(rewards.to(run.device)).cpu()
                all_picks = run.accelerator.gather(picks.to(run.device)).cpu()
                advantages = per_prompt_advantages(all_rewards, [prompts[i] for i in all_picks.tolist()], s.global_std)
                advantages = advantages.view(n, -1)[rank].view(-1)
                first_epoch, first_start = 0, 0
            with torch.no_grad(), run.accelerator.autocast():
                cond = policy.encode_prompts([prompts[i] for i in picks.tolist()], height=size, width=size)
            cond = cond.repeat_interleave(s.group_size)
            # 4. update: micro-batches x their timesteps (each image its own random subset of the T)
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
                        chosen = torch.stack([torch.randperm(s.num_steps, generator=pick_generator) for _ in index])
                        for j in range(n_train):
                            t = timesteps[chosen[:, j].to(timesteps.device)]
                            noise = torch.randn(x0[index].shape, generator=generator).to(run.device)
                            with run.accelerator.autocast():
                                loss, step_metrics = self.nft_step(policy, x0[index], cond.select(index), t, noise,
                                                                   advantages[index])
                            run.backward(loss / (accumulation * n_train))
                            for k, v in step_metrics.items():
                                metrics[k] = metrics.get(k, 0.0) + v / (accumulation * n_train)
                    next_epoch, next_start = divmod(epoch * round_size + start + micro * accumulation, round_size)
                    tensors.clear()
                    if next_epoch < s.num_inner_epochs:  # else the round is done; the next one starts fresh
                        tensors.update({
                            "round.picks": picks, "round.x0": x0, "round.advantages": advantages, "round.order": order,
                            "round.position": torch.tensor([next_epoch, next_start]),
                            **{f"round.metric.{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in round_metrics.items()},
                        })
                    end_step(run, cfg, policy, step, metrics, params, optimizer, lr_scheduler, state,
                             evaluate=lambda: self.evaluate(policy, eval_reward))
                first_start = 0

        after = self.evaluate(policy, eval_reward)
        return finish_run(run, cfg, policy, before, after)
