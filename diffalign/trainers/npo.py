"""Self-NPO (Wang et al. 2025, arXiv 2505.11777): a negative LoRA learnt from the model itself.

Negative preference optimisation (Diffusion-NPO, Wang et al., ICLR 2025) trains a *negative*
model and puts it in the unconditional branch of classifier-free guidance, so sampling is steered
away from what it generates (``diffalign.pipelines.npo.enable_npo``). The preference-based NPO
variants are the DPO / D3PO / GRPO trainers with ``negative: true``. Self-NPO needs no labels and
no reward: *truncated diffusion fine-tuning* pulls the model toward its own negatively guided
predictions. Each training sample (notation: ``x_t = a_t x0 + s_t noise``):

1. a noised sample at a random timestep t_k of the sampler's grid: an image-caption pair
   noised by the forward process, or, with prompts only, the base model's own DDIM chain from
   pure noise stopped at t_k;
2. the teacher, the same denoiser with an EMA copy of the negative LoRA, takes
   ``teacher_steps`` deterministic DDIM steps with negative guidance
   ``pred = cond + w (cond - uncond)``, w < 0, and predicts x0_T where it stops (t_e);
3. x_{t_e} is moved by the forward process to a timestep s drawn uniformly above t_e:
   ``x_s = (a_s / a_e) x_{t_e} + sqrt(s_s^2 - (a_s / a_e)^2 s_e^2) noise``;
4. the student (the LoRA, conditioned on the prompt, no guidance) predicts x0 at (x_s, s) and
   regresses onto x0_T with the pseudo-Huber loss (c = 0.001); the teacher's LoRA then follows
   the student's by EMA (decay 0.999).

Defaults follow the authors' code (G-U-N/Diffusion-NPO, ``Self-NPO/train*.py``): a 25-step grid,
5 teacher steps, w = -1 (SD1.5) and -5 (SDXL). Differences: a LoRA instead of full fine-tuning
(the output is a negative LoRA any pipeline can load); the teacher never steps past the last grid
timestep (the reference clamps to t = 0 there); prompt-only data via base-model chains; FLUX
through true CFG with its flow forward process (a_t = 1 - sigma, s_t = sigma; w = -1 by default,
a diffalign choice the paper does not cover).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from diffalign import lora
from diffalign.config import BaseRunConfig, describe_batch, register_method
from diffalign.data import load_prompts
from diffalign.errors import UserError
from diffalign.losses import self_npo_loss
from diffalign.pipelines.base import Conditioning, DiffusionPolicy
from diffalign.run import Run, TrainingState
from diffalign.training import (
    DEFAULT_GUIDANCE,
    build_optimization,
    load_trainable_policy,
    log_samples,
    optimizer_step,
    save_final_lora,
)

# Teacher guidance w per family when self_npo.guidance_scale is unset (paper: SD1.5 -1, SDXL -5).
DEFAULT_NEGATIVE_GUIDANCE = {"sd": -1.0, "sdxl": -5.0, "flux": -1.0, "sd3": -1.0}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class SelfNPOSettings(BaseModel):
    """The truncated diffusion fine-tuning objective."""

    model_config = ConfigDict(extra="forbid")

    guidance_scale: float | None = Field(
        None, description="Teacher guidance w in cond + w (cond - uncond), w < 0. None: the "
        "family default (paper: -1 SD1.5, -5 SDXL; FLUX -1, through true CFG).",
    )
    num_grid_steps: int = Field(25, ge=2, description="Steps of the sampler grid the truncated chains run on (reference: 25).")
    teacher_steps: int = Field(5, ge=1, description="Deterministic DDIM steps of the teacher per sample (reference: 5).")
    huber_c: float = Field(0.001, gt=0, description="Pseudo-Huber constant c (latent units).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the teacher's LoRA, per optimizer step.")
    start_guidance_scale: float | None = Field(
        None, ge=0, description="Prompts only: CFG scale of the base-model chain that makes the noised "
        "samples. None: the family's sampling default (SD 7.5, SDXL 5, FLUX 1 with embedded guidance).",
    )

    @field_validator("guidance_scale")
    @classmethod
    def _negative_guidance(cls, value: float | None) -> float | None:
        if value is not None and value >= 0:
            raise ValueError(
                f"{value} is not negative; the Self-NPO teacher guides away from the prompt with "
                "w < 0 (paper: -1 for SD1.5, -5 for SDXL), or leave it unset for the family default"
            )
        return value

    @model_validator(mode="after")
    def _steps_fit_grid(self) -> SelfNPOSettings:
        if self.teacher_steps >= self.num_grid_steps:
            raise ValueError(
                f"self_npo.teacher_steps ({self.teacher_steps}) must be smaller than self_npo.num_grid_steps "
                f"({self.num_grid_steps}); the reference uses 5 of 25"
            )
        return self


class SelfNPODataSettings(BaseModel):
    """Prompts (data-free) or image-caption pairs; items are drawn uniformly with replacement."""

    model_config = ConfigDict(extra="forbid")

    prompts: str | list[str] | None = Field(
        None, description="A prompt file (one per line) or a list. The noised samples come from the base model itself."
    )
    images: str | None = Field(
        None, description="Image-caption pairs: a .jsonl manifest of {image, prompt} (paths relative to it) "
        "or a folder of images each with a same-name .txt caption. Noised by the forward process.",
    )
    random_flip: bool = Field(False, description="Images: horizontal flip with p=0.5.")
    cache: Literal["none", "memory", "disk"] = Field(
        "none", description="data.images: encode every image (VAE posterior; with random_flip its mirror too) and "
        "caption once before training and train from the cache (same losses). memory = in RAM on every process; "
        "disk = safetensors shards under data.cache_dir, reused by later runs with the same model, data and resolution."
    )
    cache_dir: str | None = Field(None, description="Folder for data.cache=disk (default $DIFFALIGN_CACHE/latents).")

    @model_validator(mode="after")
    def _one_source(self) -> SelfNPODataSettings:
        if (self.prompts is None) == (self.images is None):
            raise ValueError(
                "set exactly one of data.prompts (a prompt file or list) and data.images "
                "(a .jsonl manifest or a folder of image + .txt caption pairs)"
            )
        if self.cache != "none" and self.images is None:
            raise ValueError("data.cache caches data.images; with data.prompts (data-free) there is nothing to cache")
        return self


class SelfNPOConfig(BaseRunConfig):
    method: Literal["self_npo"] = "self_npo"
    self_npo: SelfNPOSettings = Field(default_factory=SelfNPOSettings, description="The Self-NPO objective.")
    data: SelfNPODataSettings = Field(..., description="Prompts or image-caption pairs.")


register_method("self_npo", SelfNPOConfig, "diffalign.trainers.npo:SelfNPOTrainer")


# --- forward-process maths, for every family -------------------------------------------------------


def forward_coefficients(policy: DiffusionPolicy, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a, s, c, d), each [B, 1, 1, 1] fp32, at timesteps t [B]: the family's forward process
    ``x_t = a x0 + s noise`` and training target ``y = c x0 + d noise``.

    Read off ``policy.noise`` / ``policy.target``, which are linear in (x0, noise) for every family
    (epsilon: c=0, d=1; v: c=-s, d=a; flow: a=1-sigma, s=sigma, c=-1, d=1).
    """
    ones = torch.ones(len(t), 1, 1, 1, device=policy.device)
    zeros = torch.zeros_like(ones)
    return (
        policy.noise(ones, zeros, t), policy.noise(zeros, ones, t),
        policy.target(ones, zeros, t), policy.target(zeros, ones, t),
    )


def predicted_x0(model_output: Tensor, x_t: Tensor, a: Tensor, s: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Clean latents from a denoiser output y at x_t, solving x_t = a x0 + s n, y = c x0 + d n:

        x0 = (d x_t - s y) / (d a - s c)

    (epsilon: (x_t - s eps) / a; v: a x_t - s v; flow: x_t - sigma v). All fp32, [B, C, h, w].
    """
    return (d * x_t.float() - s * model_output.float()) / (d * a - s * c)


def ddim_step_to(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor, a_next: Tensor, s_next: Tensor) -> Tensor:
    """Deterministic DDIM step (eta = 0) from x_t to the next timestep, given the predicted x0:
    noise_hat = (x_t - a x0) / s, x_next = a_next x0 + s_next noise_hat. For flow models this is
    exactly the Euler step of the ODE."""
    noise_hat = (x_t.float() - a * x0) / s
    return a_next * x0 + s_next * noise_hat


def renoise(x_e: Tensor, a_e: Tensor, s_e: Tensor, a_s: Tensor, s_s: Tensor, noise: Tensor) -> Tensor:
    """Move a sample of timestep e to a later timestep s by the forward process q(x_s | x_e):

        x_s = (a_s / a_e) x_e + sqrt(s_s^2 - (a_s / a_e)^2 s_e^2) noise

    which keeps x0's coefficient a_s and makes the total noise std s_s (needs s after e).
    """
    ratio = a_s / a_e
    extra_std = (s_s**2 - (ratio * s_e) ** 2).clamp(min=0).sqrt()
    return ratio * x_e.float() + extra_std * noise.float()


@contextlib.contextmanager
def lora_weights_swapped(denoiser: torch.nn.Module, weights: dict[str, Tensor]) -> Iterator[None]:
    """Run the denoiser with the adapter holding ``weights`` (the EMA teacher), then put the
    trained weights back bit for bit. No second copy of the denoiser."""
    trained = lora.lora_state_dict(denoiser)
    lora.set_lora_state_dict(denoiser, weights)
    try:
        yield
    finally:
        lora.set_lora_state_dict(denoiser, trained)


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], params: dict[str, torch.nn.Parameter], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place."""
    for name, param in params.items():
        ema[name].mul_(decay).add_(param.detach().to(ema[name].dtype), alpha=1 - decay)


# --- image-caption pairs -------------------------------------------------------------------------


class ImageCaptions:
    """Image-caption pairs from a .jsonl manifest ({"image": path, "prompt": text} per line, paths
    relative to it) or from a folder of images each with a same-name .txt caption."""

    def __init__(self, source: str) -> None:
        path = Path(source)
        self.items: list[tuple[Path, str]] = []
        if path.is_dir():
            for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                caption = image.with_suffix(".txt")
                if caption.is_file():
                    self.items.append((image, caption.read_text().strip()))
        elif path.is_file() and path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.items.append((path.parent / row["image"], str(row["prompt"])))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise UserError(f"data.images: {path} line {number} is not {{\"image\": ..., \"prompt\": ...}} ({err})") from None
        else:
            raise UserError(f"data.images: {source} is neither a folder nor a .jsonl manifest")
        if not self.items:
            raise UserError(f"data.images: {source} holds no image-caption pairs (image + same-name .txt, or manifest lines)")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, resolution: int, flip: bool) -> tuple[Tensor, str, tuple[int, int], tuple[int, int]]:
        """Image ``index`` resized (shorter side), centre-cropped: ([3, R, R] in [-1, 1], prompt,
        original (h, w), crop (top, left))."""
        import torchvision.transforms.functional as TF
        from PIL import Image, UnidentifiedImageError

        path, prompt = self.items[index]
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"data.images: cannot read image {path} ({err})") from None
        x = TF.resize(TF.pil_to_tensor(image), resolution, antialias=True)
        top, left = (x.shape[-2] - resolution) // 2, (x.shape[-1] - resolution) // 2
        x = x[:, top : top + resolution, left : left + resolution]
        x = x.flip(-1) if flip else x
        return x.float() / 127.5 - 1.0, prompt, (image.height, image.width), (top, left)


# --- the trainer -------------------------------------------------------------------------------------


class SelfNPOTrainer:
    """``SelfNPOTrainer(config).train()`` -> the directory of the final (negative) LoRA."""

    def __init__(self, config: SelfNPOConfig, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite
        self.cache = None  # a diffalign.latent_cache.PairCache of data.images when data.cache is set

    def negative_guidance(self, family: str) -> float:
        w = self.cfg.self_npo.guidance_scale
        return DEFAULT_NEGATIVE_GUIDANCE[family] if w is None else w

    def start_latents(
        self, policy: DiffusionPolicy, grid: Tensor, positions: Tensor, cond: Conditioning,
        generator: torch.Generator, x0: Tensor | None,
    ) -> Tensor:
        """Noised samples [B, C, h, w] at grid[positions]: the forward process applied to ``x0``, or
        (x0 None) the base model's deterministic chain from pure noise stopped at each position."""
        b = len(positions)
        shape = (b, *policy.latent_shape(policy.default_resolution(), policy.default_resolution()))
        noise = torch.randn(shape, generator=generator).to(policy.device)
        if x0 is not None:
            return policy.noise(x0, noise, grid[positions])
        guidance = self.cfg.self_npo.start_guidance_scale
        guidance = DEFAULT_GUIDANCE[policy.family] if guidance is None else guidance
        x = noise
        with torch.no_grad(), policy.reference():
            for k in range(int(positions.max())):
                t, t_next = grid[k].expand(b), grid[k + 1].expand(b)
                a, s, c, d = forward_coefficients(policy, t)
                a_n, s_n, _, _ = forward_coefficients(policy, t_next)
                x0_hat = predicted_x0(policy.predict(x, t, cond, guidance), x, a, s, c, d)
                moving = (positions > k).view(-1, 1, 1, 1)
                x = torch.where(moving, ddim_step_to(x, x0_hat, a, s, a_n, s_n), x)
        return x

    def teacher_target(
        self, policy: DiffusionPolicy, grid: Tensor, positions: Tensor, x: Tensor, cond: Conditioning,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The negatively guided teacher chain (run it with the EMA weights in place): up to
        ``teacher_steps`` DDIM steps from grid[positions], never past the last grid timestep.
        Returns (x_e [B, C, h, w], t_e [B], the teacher's guided x0 at (x_e, t_e))."""
        guidance = 1.0 + self.negative_guidance(policy.family)  # uncond + g (cond - uncond) = cond + w (cond - uncond)
        last = len(grid) - 1
        with torch.no_grad():
            for _ in range(self.cfg.self_npo.teacher_steps):
                t = grid[positions]
                following = (positions + 1).clamp(max=last)
                a, s, c, d = forward_coefficients(policy, t)
                a_n, s_n, _, _ = forward_coefficients(policy, grid[following])
                x0_hat = predicted_x0(policy.predict(x, t, cond, guidance), x, a, s, c, d)
                moving = (positions < last).view(-1, 1, 1, 1)
                x = torch.where(moving, ddim_step_to(x, x0_hat, a, s, a_n, s_n), x)
                positions = following
            t_e = grid[positions]
            a, s, c, d = forward_coefficients(policy, t_e)
            x0_teacher = predicted_x0(policy.predict(x, t_e, cond, guidance), x, a, s, c, d)
        return x, t_e, x0_teacher

    def later_timesteps(self, policy: DiffusionPolicy, t_e: Tensor, generator: torch.Generator) -> Tensor:
        """s [B] uniform strictly above t_e: integers up to num_train_timesteps - 1 (SD/SDXL), or
        1000 * sigma up to 1000 (flow)."""
        u = torch.rand(len(t_e), generator=generator).to(t_e.device)
        if policy.prediction_type == "flow":
            return t_e + (1.0 - u) * (1000.0 - t_e)  # (t_e, 1000]
        t_max = policy.num_train_timesteps - 1
        low = t_e.long() + 1  # the chain ends below the grid's top, so low <= t_max
        return low + (u * (t_max - low + 1).float()).long()  # u < 1: at most t_max

    def npo_step(
        self, policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator, grid: Tensor,
        x0: Tensor | None = None, original_sizes=None, crops_top_left=None, ema: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss and metrics of one micro-batch (gradients flow into the LoRA). ``x0``: latents of
        image-caption pairs, or None for prompts only. ``ema``: the teacher's LoRA weights (None:
        the current weights)."""
        size = policy.default_resolution()
        if self.cache is not None:  # data.cache: stored rows, then the images' own sizes and crops
            cond = self.cache.conditioning(prompts, policy.device, with_uncond=True)
            cond = policy.with_image_sizes(cond, size, size, original_sizes, crops_top_left)
        else:
            cond = policy.encode_prompts(
                prompts, with_uncond=True, height=size, width=size,
                original_sizes=original_sizes, crops_top_left=crops_top_left,
            )
        positions = torch.randint(0, len(grid), (len(prompts),), generator=generator).to(grid.device)
        x = self.start_latents(policy, grid, positions, cond, generator, x0)
        with lora_weights_swapped(policy.denoiser, ema) if ema is not None else contextlib.nullcontext():
            x_e, t_e, x0_teacher = self.teacher_target(policy, grid, positions, x, cond)
        s = self.later_timesteps(policy, t_e, generator)
        noise = torch.randn(x_e.shape, generator=generator).to(x_e.device)
        a_e, s_e, _, _ = forward_coefficients(policy, t_e)
        a_s, s_s, c_s, d_s = forward_coefficients(policy, s)
        x_s = renoise(x_e, a_e, s_e, a_s, s_s, noise)
        student = predicted_x0(policy.predict(x_s, s, dataclasses.replace(cond, uncond=None)), x_s, a_s, s_s, c_s, d_s)
        loss, metrics = self_npo_loss(student, x0_teacher, self.cfg.self_npo.huber_c)
        metrics.update(t_start=grid[positions].float().mean().item(), t_end=t_e.float().mean().item(),
                       t_student=s.float().mean().item())
        return loss, metrics

    def train(self) -> Path:
        cfg = self.cfg
        run = Run(cfg, overwrite=self.overwrite)
        policy, _ = load_trainable_policy(cfg, run)
        params = lora.lora_parameters(policy.denoiser)
        optimizer, lr_scheduler = build_optimization(cfg, list(params.values()))
        images = ImageCaptions(cfg.data.images) if cfg.data.images is not None else None
        prompts = load_prompts(cfg.data.prompts, "data.prompts") if images is None else None
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * run.accelerator.process_index)
        ema = {name: p.detach().clone().float() for name, p in params.items()}
        state = TrainingState(
            params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generators={"noise": generator}, data_state={}, extra_tensors={f"ema.{k}": v for k, v in ema.items()},
        )
        start_step = run.restore(state)
        ema = {k: state.extra_tensors[f"ema.{k}"] for k in params}  # restored in place
        size = policy.default_resolution()
        if cfg.data.cache != "none":
            from diffalign.latent_cache import encode_captions, load_pair_cache

            self.cache = load_pair_cache(run, policy, cfg, images, size, encode_captions, "images")
        grid, _ = policy.schedule(cfg.self_npo.num_grid_steps, size, size)
        w = self.negative_guidance(policy.family)
        dataset_size = len(images) if images is not None else len(prompts)
        run.print(describe_batch(cfg, run.accelerator.num_processes, None, items_per_sample="samples"))
        run.print(
            f"data: {dataset_size} {'image-caption pairs' if images is not None else 'prompts (data-free)'}, "
            f"drawn with replacement; per sample {cfg.self_npo.teacher_steps + 1} teacher calls with CFG "
            f"(w = {w}) on a {cfg.self_npo.num_grid_steps}-step grid"
            + ("" if images is not None else f" + up to {cfg.self_npo.num_grid_steps - 1} base-model steps")
        )
        run.print(f"model {cfg.model} ({policy.family}, {policy.prediction_type}), {size}px, "
                  f"{sum(p.numel() for p in params.values()):,} LoRA parameters, EMA decay {cfg.self_npo.ema_decay}")

        for step in range(start_step + 1, cfg.train.max_steps + 1):
            metrics: dict[str, float] = {}
            for _ in range(cfg.train.gradient_accumulation_steps):
                # 1. sample: prompts (or image-caption pairs) for this micro-batch
                picks = torch.randint(0, dataset_size, (cfg.train.batch_size,), generator=generator).tolist()
                x0, sizes, crops = None, None, None
                if images is not None:
                    flips = (torch.rand(len(picks), generator=generator) < 0.5).tolist()
                    load = self.cache.image if self.cache is not None else lambda i, f: images.load(i, size, f)
                    rows = [load(i, cfg.data.random_flip and f) for i, f in zip(picks, flips)]
                    batch_prompts = [r[1] for r in rows]
                    sizes, crops = [r[2] for r in rows], [r[3] for r in rows]
                    with torch.no_grad():
                        stacked = torch.stack([r[0] for r in rows]).to(policy.device)
                        x0 = (policy.latents_from_posterior(stacked, generator) if self.cache is not None
                              else policy.encode_images(stacked, generator))
                else:
                    batch_prompts = [prompts[i] for i in picks]
                # 2. score: the EMA teacher's negatively guided x0 after a truncated chain, and
                # 3. the student's x0 at a re-noised, strictly later timestep
                with run.accelerator.autocast():
                    loss, micro = self.npo_step(policy, batch_prompts, generator, grid, x0, sizes, crops, ema)
                run.backward(loss / cfg.train.gradient_accumulation_steps)
                for key, value in micro.items():
                    metrics[key] = metrics.get(key, 0.0) + value / cfg.train.gradient_accumulation_steps
            # 4. update: optimizer step on the synced gradients, then the teacher follows by EMA
            metrics = run.mean_over_processes({key: float(value) for key, value in metrics.items()})
            # the loss is averaged first, so every process skips (train.skip_nonfinite_updates) or stops together
            metrics.update(optimizer_step(run, list(params.values()), optimizer, lr_scheduler, cfg.train,
                                          loss=metrics["loss"]))
            ema_update(ema, params, cfg.self_npo.ema_decay)
            metrics["lr"] = lr_scheduler.get_last_lr()[0]
            if run.should_log(step):
                run.log(step, metrics)
            if run.should_sample(step):
                log_samples(run, policy, cfg, step)
            run.maybe_checkpoint(step, state)

        final = save_final_lora(run, policy, cfg, {"negative": "true", "npo_guidance_scale": str(w)})
        run.print(f"final negative LoRA: {final} (use it with diffalign generate --npo {final})")
        run.finish()
        return final
