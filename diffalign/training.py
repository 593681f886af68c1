"""Pieces every trainer's loop shares, as plain functions: a trainable policy, the optimiser
step, evaluation samples and the final LoRA. (The run directory, checkpoints and logging live
in ``run.py``.)"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from diffalign import lora
from diffalign.config import BaseRunConfig, TrainSettings
from diffalign.console import run_summary_lines
from diffalign.errors import UserError
from diffalign.files import is_disk_full
from diffalign.guard import finish_guard, guard_for
from diffalign.optim import build_lr_scheduler, build_optimizer, clip_gradients, maybe_enable_xformers, sync_gradients
from diffalign.pipelines.base import DiffusionPolicy
from diffalign.pipelines.loading import load_policy
from diffalign.run import Run

# Classifier-free guidance used for sample grids when logging.sample_guidance_scale is unset.
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "flux": 1.0, "sd3": 4.5}  # SD3.5-M: its model card, Flow-GRPO


def load_trainable_policy(cfg: BaseRunConfig, run: Run, **policy_options) -> tuple[DiffusionPolicy, list[torch.nn.Parameter]]:
    """Load ``cfg.model`` on the run's device and dtype, add the LoRA adapter (fresh, or
    ``cfg.init_lora`` to continue; ``cfg.reference`` picks the reference model), and apply the
    memory options. Returns the policy and its trainable LoRA parameters (fp32)."""
    with run.accelerator.main_process_first():  # the tiny models are built once, on rank 0
        policy = load_policy(
            cfg.model, device=run.device, torch_dtype=run.weight_dtype, resolution=cfg.train.resolution, **policy_options
        )
    check_resolution(policy, cfg.train.resolution)
    check_model_specific_options(cfg, policy)
    maybe_enable_xformers(policy.pipe, cfg.train)
    if cfg.train.gradient_checkpointing:
        policy.denoiser.enable_gradient_checkpointing()
    # A fresh adapter, or init_lora's weights to continue (reference: init keeps a frozen copy)
    params = lora.add_trainable_lora(policy.denoiser, policy.family, cfg.lora, cfg.init_lora, cfg.reference)
    if cfg.reference == "init":
        policy.reference_adapter = lora.INIT_ADAPTER
    return policy, params


# Options that act on flow-matching models only (FLUX, SD3): section, key, the value that means "off".
FLOW_ONLY_OPTIONS = [("dpo", "timestep_sampling", "uniform")]


def check_model_specific_options(cfg: BaseRunConfig, policy: DiffusionPolicy) -> None:
    """UserError for an option set on a model it does not act on (it would be ignored silently)."""
    if policy.prediction_type == "flow":
        return
    for section, key, off in FLOW_ONLY_OPTIONS:
        settings = getattr(cfg, section, None)
        value = getattr(settings, key, off)
        if value != off:
            raise UserError(
                f"{section}.{key}={value} acts on flow-matching models only (FLUX, SD3); the {policy.family} "
                f"model ({policy.prediction_type}) would ignore it: remove it or set {section}.{key}={off}"
            )


def check_resolution(policy: DiffusionPolicy, resolution: int | None) -> None:
    """UserError unless ``train.resolution`` is a multiple of the model's downsampling (the
    VAE's, times FLUX's 2x2 packing), naming the multiples allowed."""
    if resolution is None:
        return
    try:
        policy.latent_shape(resolution, resolution)
    except ValueError:
        factor = next(f for f in range(1, 257) if _fits(policy, f))
        lower, upper = resolution // factor * factor, (resolution // factor + 1) * factor
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise UserError(
            f"train.resolution={resolution}: the {policy.family} model needs a multiple of {factor} "
            f"(its downsampling), e.g. {nearest}"
        ) from None


def _fits(policy: DiffusionPolicy, size: int) -> bool:
    try:
        policy.latent_shape(size, size)
    except ValueError:
        return False
    return True


def build_optimization(cfg: BaseRunConfig, params: Sequence[torch.nn.Parameter]):
    """AdamW (8-bit when asked) over ``params`` and its learning-rate schedule."""
    optimizer = build_optimizer(params, cfg.train)
    return optimizer, build_lr_scheduler(optimizer, cfg.train)


def optimizer_step(
    run: Run, params: Sequence[torch.nn.Parameter], optimizer, lr_scheduler, train: TrainSettings,
    loss: float | None = None,
) -> dict[str, float]:
    """All-reduce the LoRA gradients across processes, unscale (fp16), clip, step, advance the
    schedule and zero the gradients. Returns ``{"grad_norm": norm before clipping}`` (and the
    fp16 ``loss_scale``).

    A non-finite ``loss`` (averaged over processes) or gradient norm is never applied. In fp16
    with a loss scale of 1 or more a non-finite norm (of a finite loss) is an overflow of the
    scale: the update is skipped and the scale halved, as torch's GradScaler does. Else the
    update is skipped (``{"skipped_updates": total}``) while fewer than
    ``train.skip_nonfinite_updates`` were skipped in a row, and the run stops after that with
    the last checkpoint to resume from. Every process sees the same all-reduced gradients and
    averaged loss, so all skip or stop together."""
    sync_gradients(params, run.accelerator)
    scaler = run.grad_scaler
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(params, train.max_grad_norm)
    loss_finite = loss is None or math.isfinite(loss)
    if loss is not None and loss_finite:
        run.confirm_finite_loss()
    if loss_finite and math.isfinite(grad_norm):
        run.skipped_in_a_row = 0
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        lr_scheduler.step()
        metrics = {"grad_norm": grad_norm}
    elif loss_finite and scaler is not None and scale >= 1.0:
        metrics = {}  # the loss scale overflowed: scaler.update() below halves it
    else:
        what = f"the gradient norm is {grad_norm}" if loss_finite else f"the loss is {loss}"
        if run.skipped_in_a_row >= train.skip_nonfinite_updates:
            optimizer.zero_grad(set_to_none=True)
            where = run.resume_advice(loss_finite)
            raise UserError(
                f"{what} (the update was not applied; {run.skipped_in_a_row} skipped in a row before it); "
                f"{where} with a lower train.learning_rate, or set train.skip_nonfinite_updates=N to skip such "
                "updates, or train.sdpa_backends=[flash,efficient,math] if this is bf16/fp16 on an H100/H200"
            )
        run.skipped_in_a_row += 1
        run.skipped_updates += 1
        run.print(f"warning: {what}; update skipped ({run.skipped_in_a_row} in a row)")
        metrics = {"skipped_updates": float(run.skipped_updates)}
    if scaler is not None:
        scaler.update()
        metrics["loss_scale"] = scaler.get_scale()
    optimizer.zero_grad(set_to_none=True)
    return metrics


@torch.no_grad()
def sample_images(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    seed: int,
    num_steps: int,
    guidance_scale: float | None = None,
) -> Tensor:
    """Deterministic samples (DDIM eta=0 / flow ODE) for fixed prompts and seed: [N, 3, H, W] in [0, 1]."""
    guidance = DEFAULT_GUIDANCE[policy.family] if guidance_scale is None else guidance_scale
    with policy.frozen_on_device():  # train.offload_frozen: text encoders and VAE back for the samples
        cond = policy.encode_prompts(list(prompts), with_uncond=guidance != 1.0)
        generator = torch.Generator().manual_seed(seed)
        trajectory = policy.sample(cond, num_steps, guidance_scale=guidance, noise_level=0.0, generator=generator)
    return trajectory.images


def log_samples(run: Run, policy: DiffusionPolicy, cfg: BaseRunConfig, step: int) -> None:
    """Write the sample grid of ``logging.sample_prompts`` for ``step`` (all processes sample in
    step, so collective calls stay aligned; only the main process writes)."""
    images = sample_images(
        policy, cfg.logging.sample_prompts, cfg.logging.sample_seed, cfg.logging.sample_steps,
        cfg.logging.sample_guidance_scale,
    )
    run.sample_grid(step, images, cfg.logging.sample_prompts)


def save_final_lora(run: Run, policy: DiffusionPolicy, cfg: BaseRunConfig, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``out_dir/final`` (diffusers-format LoRA with alpha) on the main process."""
    final = run.out_dir / "final"
    if run.is_main:
        try:
            lora.save_lora(policy.pipe, policy.denoiser, final, cfg.lora, policy.family, extra_metadata, method=cfg.method)
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise UserError(
                f"disk full while writing {final / lora.LORA_WEIGHT_NAME}; the last checkpoint {run.last_checkpoint} "
                "is intact (free some space, then resume=latest writes final/ again)"
            ) from None
    run.accelerator.wait_for_everyone()
    return final


def check_finite(loss: float | Tensor, step: int) -> None:
    """Stop with a clear message on a NaN/inf loss (before the optimizer step uses its gradients).
    Pass a float where possible: a tensor is converted here, which waits for the device.
    Trainers pass the loss to :func:`optimizer_step` instead, which skips such updates under
    ``train.skip_nonfinite_updates`` and names the checkpoint to resume from."""
    loss = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if not math.isfinite(loss):
        raise UserError(
            f"loss became {loss} at step {step}; lower train.learning_rate, set train.max_grad_norm, "
            "or use train.mixed_precision=bf16 instead of fp16 (the last checkpoint is intact)"
        )


# --- evaluation: mean reward on fixed prompts and seeds -----------------------------------------


class EvalSettings(BaseModel):
    """Mean reward of deterministic samples on fixed prompts and seeds, at the start and end of a
    run (and at every ``logging.sample_every``), so a run shows whether the reward moved."""

    model_config = ConfigDict(extra="forbid")

    reward: str | dict | None = Field(None, description="Reward spec from the registry (e.g. brightness, pickscore); null = off.")
    prompts: list[str] = Field(
        default_factory=lambda: ["a sunny beach", "a cat on a sofa", "a city street", "a bowl of fruit"],
        min_length=1,
        description="Evaluation prompts (at least one).",
    )
    seed: int = Field(0, ge=0, description="Seed of the evaluation noise.")
    num_images_per_prompt: int = Field(2, ge=1, description="Samples per prompt (seeds seed, seed+1, ...).")
    num_steps: int = Field(20, ge=1, description="Sampler steps.")
    guidance_scale: float | None = Field(None, description="CFG scale; null = the family default.")
    grid: bool = Field(
        False, description="At the end, write before_after.png in the run folder: the evaluation prompts (one column "
        "each) sampled by the base model and by the trained one with the same seeds, a base row above a trained row "
        "per seed.",
    )


@torch.no_grad()
def write_before_after(run: Run, policy: DiffusionPolicy, settings: EvalSettings) -> Path | None:
    """``before_after.png`` (see ``EvalSettings.grid``): the adapter switched off gives the base
    model, so base and trained samples share prompts, seeds and sampler. Rows that an evaluation of
    this run already sampled are reused (see :func:`_kept_rows`); the rest are sampled here. Every
    process samples (the same work on each); the main process writes. Returns its path there."""
    from torchvision.utils import make_grid

    base_rows, trained_rows = _kept_rows(policy, settings)
    rows = []
    for k in range(settings.num_images_per_prompt):
        if base_rows is None:
            with lora.adapter_disabled(policy.denoiser):
                rows.append(_eval_samples(policy, settings, k))
        else:
            rows.append(base_rows[k])
        rows.append(_eval_samples(policy, settings, k) if trained_rows is None else trained_rows[k])
    if not run.is_main:
        return None
    images = torch.cat([row.cpu() for row in rows])
    grid = make_grid(images, nrow=len(settings.prompts), padding=2, pad_value=1.0)
    path = run.out_dir / "before_after.png"
    caption = "rows: base, trained (seed {s}); columns: " + " | ".join(settings.prompts)
    run.write_image(path, grid, "\n".join(caption.format(s=settings.seed + k) for k in range(settings.num_images_per_prompt)) + "\n")
    return path


def _eval_samples(policy: DiffusionPolicy, settings: EvalSettings, k: int) -> Tensor:
    """The evaluation prompts sampled with seed ``settings.seed + k``: [P, 3, H, W] float32."""
    return sample_images(policy, settings.prompts, settings.seed + k, settings.num_steps, settings.guidance_scale).float()


@torch.no_grad()
def evaluate_reward(policy: DiffusionPolicy, reward, settings: EvalSettings) -> float:
    """Mean ``reward`` over ``num_images_per_prompt`` deterministic samples of each prompt. With
    ``settings.grid`` the samples are kept for :func:`write_before_after`."""
    scores, rows = [], []
    for k in range(settings.num_images_per_prompt):
        images = _eval_samples(policy, settings, k)
        scores.append(reward(images, list(settings.prompts)).float().cpu())
        if settings.grid:
            rows.append(images.cpu())
    if settings.grid:
        _keep_rows(policy, settings, rows)
    return torch.cat(scores).mean().item()


# Evaluation samples kept for before_after.png, by policy: "base" holds the first evaluation's rows
# if the adapter added nothing then (every LoRA B factor zero, as peft initialises it); "trained"
# holds the latest evaluation's rows with a copy of the trainable weights they were sampled with.
_KEPT_SAMPLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _grid_key(settings: EvalSettings) -> tuple:
    return (tuple(settings.prompts), settings.seed, settings.num_images_per_prompt, settings.num_steps,
            settings.guidance_scale)


def _trainable_weights(policy: DiffusionPolicy) -> list[Tensor]:
    return [param.detach().to("cpu", copy=True) for param in policy.denoiser.parameters() if param.requires_grad]


def _adapter_adds_nothing(policy: DiffusionPolicy) -> bool:
    return all(not param.count_nonzero() for name, param in policy.denoiser.named_parameters() if "lora_B" in name)


def _keep_rows(policy: DiffusionPolicy, settings: EvalSettings, rows: list[Tensor]) -> None:
    kept = _KEPT_SAMPLES.setdefault(policy, {})
    key = _grid_key(settings)
    if "base" not in kept and _adapter_adds_nothing(policy):
        kept["base"] = (key, rows)
    kept["trained"] = (key, rows, _trainable_weights(policy))


def _kept_rows(policy: DiffusionPolicy, settings: EvalSettings) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """(base rows, trained rows) that an evaluation with these settings sampled and that still
    show what the grid claims: the base rows came from an adapter that added nothing (a zero B
    factor adds an exact zero, so they equal the adapter-off samples), the trained rows from the
    weights the policy has now (the guard's ``keep_best`` may have put an earlier check's back).
    None for either one to sample again."""
    kept = _KEPT_SAMPLES.get(policy, {})
    key = _grid_key(settings)
    base = kept.get("base")
    trained = kept.get("trained")
    if trained is not None:
        now = _trainable_weights(policy)
        same = trained[0] == key and len(now) == len(trained[2]) and all(map(torch.equal, now, trained[2]))
        trained = trained if same else None
    return (base[1] if base is not None and base[0] == key else None,
            trained[1] if trained is not None else None)


# --- the bookkeeping every trainer's loop ends a step and a run with --------------------------------


def log_start_evaluation(run: Run, start_step: int, evaluate) -> dict[str, float]:
    """``evaluate()``'s metrics before training, logged at step 0; nothing on a resumed run."""
    before = evaluate() if start_step == 0 else {}
    if before:
        run.log(0, before)
    return before


def draw_prompts(prompts: Sequence[str], count: int, generator: torch.Generator) -> list[str]:
    """``count`` prompts drawn uniformly with replacement (reproducible from ``generator``)."""
    picks = torch.randint(len(prompts), (count,), generator=generator)
    return [prompts[i] for i in picks.tolist()]


def end_step(
    run: Run,
    cfg: BaseRunConfig,
    policy: DiffusionPolicy,
    step: int,
    metrics: dict,
    params: Sequence[torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    state,
    evaluate=None,
) -> dict[str, float]:
    """The update and what follows it, after the step's gradients are accumulated: average the
    metrics over processes (one device sync), stop on a non-finite loss, sync/clip/step, log,
    write the sample grid (and ``evaluate()``'s metrics) every ``logging.sample_every`` steps,
    maybe checkpoint, and let the reward-hacking guard (diffalign.guard) check the step."""
    metrics = run.mean_over_processes({key: float(value) for key, value in metrics.items()})
    guard = guard_for(run, cfg, policy, params, step)  # None when off; measures the start on its first call
    # the loss is averaged first, so every process skips or stops together
    metrics.update(optimizer_step(run, params, optimizer, lr_scheduler, cfg.train, loss=metrics.get("loss")))
    metrics["lr"] = lr_scheduler.get_last_lr()[0]
    run.log(step, metrics)
    if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
        log_samples(run, policy, cfg, step)
        if evaluate is not None and step < cfg.train.max_steps:
            run.log(step, evaluate())
    run.maybe_checkpoint(step, state)
    if guard is not None:  # held-out reward and diversity every guard.every steps; may end the run
        guard.after_step(step, metrics)
    return metrics


def finish_run(
    run: Run,
    cfg: BaseRunConfig,
    policy: DiffusionPolicy,
    before: dict[str, float],
    after: dict[str, float],
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Log and print the evaluation before -> after, write ``final/`` (with ``guard.keep_best``: the
    LoRA of the guard's best held-out check) and close the run."""
    if after:
        run.log(cfg.train.max_steps, after)
    for key, value in after.items():
        run.print(f"{key}: " + (f"before {before[key]:.4f} -> " if key in before else "") + f"after {value:.4f}")
    finish_guard(run, cfg.train.max_steps)
    settings = getattr(cfg, "eval", None)
    if settings is not None and settings.grid:
        grid = write_before_after(run, policy, settings)
        if grid is not None:
            run.print(f"before/after samples: {grid}")
    final = save_final_lora(run, policy, cfg, extra_metadata)
    run.print(f"final LoRA: {final}")
    run.finish()
    negative = (extra_metadata or {}).get("negative") == "true"
    for line in run_summary_lines(run.out_dir, final, cfg.model, negative, cfg.logging.report):
        run.print(line)
    return final


def load_frozen_reward(spec, device: torch.device | str, dtype: torch.dtype | str | None = None):
    """A registry reward on ``device``, in eval mode with its own weights frozen (gradients can
    still flow through it to the images). While a caller holds it, the same spec, device and dtype
    give the same object.

    The device (and ``dtype`` when given) goes to the reward's factory, so a reward with weights
    (a 7B VLM judge, HPSv2's ViT-H) is loaded straight onto the device rather than built whole in
    CPU memory first; either overrides the spec's own ``device``/``dtype``. ``dtype=None`` keeps the
    spec's dtype or the reward's default. Rewards whose factory takes no device are moved after.
    """
    from diffalign.rewards import load_reward, options_taken

    key = (json.dumps(spec, sort_keys=True, default=str), str(device), str(dtype))
    reward = _LOADED_REWARDS.get(key)
    if reward is None:
        reward = load_reward(spec, **options_taken(spec, {"device": device, "dtype": dtype})).to(device)
        reward.requires_grad_(False)
        _LOADED_REWARDS[key] = reward
    return reward.eval()


# Rewards a run holds, by (spec, device, dtype): asking again for one (the guard asks for the
# trainer's eval reward) returns the same object instead of a second copy of its weights.
_LOADED_REWARDS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
