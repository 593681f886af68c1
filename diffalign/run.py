"""What every trainer shares: processes, output folder, logging, checkpoint/resume, optimizer.

Plain objects and functions, no base class. A trainer reads like::

    run = Run(cfg, overwrite=args.overwrite)
    params = add_lora(denoiser, family, cfg.lora)
    optimizer = build_optimizer(params, cfg.train)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    state = TrainingState(params=lora_parameters(denoiser), optimizer=optimizer,
                          lr_scheduler=scheduler, generators={"noise": gen}, data_state={"epoch": 0})
    step = run.restore(state)
    while step < cfg.train.max_steps:
        for _ in range(cfg.train.gradient_accumulation_steps):
            with run.accelerator.autocast():
                loss = ...
            (loss / cfg.train.gradient_accumulation_steps).backward()
        sync_gradients(params, run.accelerator)       # mean over processes, one flat buffer
        grad_norm = clip_gradients(params, cfg.train.max_grad_norm)
        optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
        step += 1
        run.log(step, {"loss": loss.item(), "grad_norm": grad_norm})
        run.maybe_checkpoint(step, state)              # every process calls it
    run.finish()

The denoiser is never wrapped in DistributedDataParallel: only the LoRA parameters train, and
:func:`sync_gradients` all-reduces their gradients once per optimizer step, which works with any
number of forward passes, adapter toggling and gradient checkpointing. Do not pass the optimizer
or scheduler to ``accelerator.prepare`` either: the scheduler steps once per optimizer step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from diffalign.config import BaseRunConfig, TrainSettings, config_to_yaml
from diffalign.errors import UserError


# --- checkpoints: checkpoints/step-N/ ----------------------------------------------------------


@dataclass
class TrainingState:
    """References to everything a checkpoint captures; restoring writes into these same objects.

    ``params``: the trainable parameters as a name -> Parameter dict (e.g.
    ``lora.lora_parameters(denoiser)``), a list of Parameters (e.g. what ``lora.add_lora``
    returns; stored by position), or a ``(get_state, set_state)`` pair of callables such as
    ``(partial(lora_state_dict, d), partial(set_lora_state_dict, d))``.
    ``generators``: the trainer's own RNGs by name (saved for every process).
    ``data_state``: a JSON-serialisable dict the trainer mutates (epoch, position).
    ``extra_tensors``: running statistics, EMA weights, ...; restored in place.
    ``data_state`` and ``extra_tensors`` are saved from the main process: keep them equal on
    every process (reduce statistics before updating them).
    """

    params: dict[str, torch.Tensor] | list[torch.Tensor] | tuple[Callable[[], dict], Callable[[dict], None]]
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    data_state: dict = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def _callables(self) -> tuple[Callable, Callable] | None:
        p = self.params
        if isinstance(p, tuple) and len(p) == 2 and all(callable(f) and not isinstance(f, torch.Tensor) for f in p):
            return p
        return None

    def _named(self) -> dict[str, torch.Tensor]:
        if isinstance(self.params, dict):
            return self.params
        return {str(i): p for i, p in enumerate(self.params)}

    def params_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name (detached, not copied)."""
        pair = self._callables()
        if pair is not None:
            return pair[0]()
        return {k: v.detach() for k, v in self._named().items()}

    def load_params_state(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        """Copy ``tensors`` into the trainable weights; UserError if names or shapes differ."""
        current = self.params_state()
        missing, unexpected = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        wrong = [k for k in current if k in tensors and tensors[k].shape != current[k].shape]
        if missing or unexpected or wrong:
            raise UserError(
                f"checkpoint {source} does not match this run's trainable weights ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(wrong)} with another shape); did lora.rank, "
                "lora.target_modules or model change?"
            )
        pair = self._callables()
        if pair is not None:
            pair[1](tensors)
            return
        with torch.no_grad():
            for name, param in self._named().items():
                param.copy_(tensors[name])


STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: Path) -> list[Path]:
    """``root/step-N`` folders, oldest first (temporary ``.tmp-*`` folders never count)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, root: Path) -> Path:
    """``resume`` ('latest', a checkpoint folder, or a run folder) -> the checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise UserError(f"resume=latest but {root} holds no checkpoint; start without resume")
        return found[-1]
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path / "checkpoints")
    if found:
        return found[-1]
    raise UserError(f"resume={resume}: not a checkpoint (expected a folder like runs/x/checkpoints/step-N)")


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    """This process's global and named RNG states, in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def _set_rng_state(rng: dict, generators: dict[str, torch.Generator]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    for gname, g in generators.items():
        if gname in rng["generators"]:
            g.set_state(rng["generators"][gname])


def _gather(obj: Any, accelerator: Accelerator) -> list:
    """``obj`` from every process, in process order (collective)."""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _save_torch(path: Path, obj: Any) -> None:
    torch.save(obj, path)
    _fsync(path)


def _save_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2))
    _fsync(path)


def save_checkpoint(
    root: Path, step: int, state: TrainingState, accelerator: Accelerator, total_limit: int | None = None
) -> Path:
    """Write ``root/step-{step}``: into ``root/.tmp-step-N-<uuid>``, fsync, rename (main process).

    A crash mid-save leaves earlier checkpoints intact and no ``step-N``. Collective: every
    process calls it; their RNG states are gathered into ``rng.pt``.
    """
    rng = _gather(_rng_state(state.generators), accelerator)
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-step-{step}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _save_tensors(tmp / "lora.safetensors", state.params_state())
            if state.optimizer is not None:
                _save_torch(tmp / "optimizer.pt", state.optimizer.state_dict())
            if state.lr_scheduler is not None:
                _save_torch(tmp / "scheduler.pt", state.lr_scheduler.state_dict())
            _save_torch(tmp / "rng.pt", {"per_process": rng})
            _save_tensors(tmp / "extra.safetensors", state.extra_tensors)
            info = {"step": step, "num_processes": accelerator.num_processes, "data_state": state.data_state}
            _save_json(tmp / "state.json", info)
            _fsync(tmp)
            old = root / f".tmp-step-{step}-old-{uuid.uuid4().hex}" if final.exists() else None
            if old is not None:
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if total_limit is not None:
            for stale in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def _load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(folder: Path, state: TrainingState, accelerator: Accelerator) -> tuple[int, int]:
    """Restore ``folder`` into ``state`` (every process reads); returns (step, processes that saved it)."""
    info = json.loads((folder / "state.json").read_text())
    state.load_params_state(safetensors.torch.load_file(str(folder / "lora.safetensors")), folder)
    if state.optimizer is not None:
        state.optimizer.load_state_dict(_load_torch(folder / "optimizer.pt"))
    if state.lr_scheduler is not None:
        state.lr_scheduler.load_state_dict(_load_torch(folder / "scheduler.pt"))
    state.data_state.clear()
    state.data_state.update(info["data_state"])
    extra = safetensors.torch.load_file(str(folder / "extra.safetensors"))
    missing = sorted(set(state.extra_tensors) - set(extra))
    if missing:
        raise UserError(f"checkpoint {folder} lacks {', '.join(missing)}; it was written by another method")
    with torch.no_grad():
        for name, tensor in extra.items():
            if name in state.extra_tensors:
                state.extra_tensors[name].copy_(tensor)
            else:
                state.extra_tensors[name] = tensor
    per_process = _load_torch(folder / "rng.pt")["per_process"]
    if len(per_process) == accelerator.num_processes:
        _set_rng_state(per_process[accelerator.process_index], state.generators)
    return info["step"], info["num_processes"]

__all__ = [
    "Run",
    "TrainingState",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "build_optimizer",
    "build_lr_scheduler",
    "sync_gradients",
    "clip_gradients",
    "maybe_enable_xformers",
    "set_sdpa_backends",
]

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.learning_rate": 1e-5, ...} with values trackers accept."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class Run:
    """One training run on this process: accelerator, run folder, metrics, samples, checkpoints.

    Attributes: ``accelerator``, ``device``, ``weight_dtype`` (for the frozen weights),
    ``out_dir``, ``is_main``, ``num_processes``, ``process_index``.
    """

    def __init__(self, cfg: BaseRunConfig, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.output_dir)
        report_to = list(cfg.logging.report_to)
        for name in report_to:
            if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
                raise UserError(
                    f"logging.report_to={name} needs the {name} package: pip install 'diffalign[{name}]' "
                    f"or remove {name} from logging.report_to"
                )

        # 1. processes, device, precision. One process may hold several Runs one after another
        # (tests, sweeps): drop the previous Run's precision settings; the process group stays.
        if hasattr(AcceleratorState, "_reset_state"):
            AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with=report_to or None, project_dir=str(self.out_dir)
        )
        self.device = self.accelerator.device
        self.weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
        self.is_main = self.accelerator.is_main_process
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
        self._sdpa_flags_before = set_sdpa_backends(cfg.train.sdpa_backends)
        self.skipped_updates = 0  # updates not applied for a non-finite gradient norm (this session)
        self.skipped_in_a_row = 0

        # 2. run folder: every process decides from the same state before the main one changes it
        self._prepare_out_dir(overwrite)

        # 3. seeds, metrics file, trackers, progress bar
        set_seed(cfg.seed)
        self._metrics = None
        self._progress = None
        if self.is_main:
            (self.out_dir / "config.yaml").write_text(config_to_yaml(cfg))
            self._metrics = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
            from tqdm.auto import tqdm

            self._progress = tqdm(total=cfg.train.max_steps, desc="train", unit="step", dynamic_ncols=True)
        if report_to:
            self.accelerator.init_trackers(cfg.logging.project_name, config=_flatten(cfg.model_dump(mode="json")))

    def _prepare_out_dir(self, overwrite: bool) -> None:
        out, resume = self.out_dir, self.cfg.resume
        if out.exists() and not out.is_dir():
            raise UserError(f"output_dir {out} is a file; choose a folder")
        non_empty = out.is_dir() and any(out.iterdir())
        resume_inside = resume is not None and (
            resume == "latest" or Path(resume).resolve().is_relative_to(out.resolve())
        )
        if overwrite and resume_inside:
            raise UserError(
                f"--overwrite would delete the checkpoint resume={resume} continues from; drop one of them"
            )
        if non_empty and not overwrite and resume is None:
            raise UserError(
                f"output_dir {out} exists and is not empty; pass --overwrite to replace it "
                "or resume=latest to continue"
            )
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if non_empty and overwrite:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()

    # --- output --------------------------------------------------------------------------

    def print(self, msg: str) -> None:
        """Print on the main process only."""
        self.accelerator.print(msg)

    def should_log(self, step: int) -> bool:
        """True every ``logging.log_every`` steps."""
        return step % self.cfg.logging.log_every == 0

    def should_sample(self, step: int) -> bool:
        """True every ``logging.sample_every`` steps (never when it is 0)."""
        every = self.cfg.logging.sample_every
        return every > 0 and step % every == 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl, send to trackers, update the bar.

        Tensors become floats; NaN/inf are written as null (metrics.jsonl stays strict JSON).
        Main process only; other processes return at once.
        """
        if not self.is_main:
            return
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._metrics.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(values, step=step)
        self._progress.update(step - self._progress.n)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "reward", "accuracy", "lr")}
        self._progress.set_postfix(shown or {k: f"{v:.4g}" for k, v in list(values.items())[:2]}, refresh=False)

    def sample_grid(self, step: int, images: torch.Tensor, prompts: list[str]) -> Path | None:
        """Save ``images: [N, 3, H, W] in [0, 1]`` as ``samples/step-{step:06d}.png`` (+ prompts .txt).

        Also sends the grid to the trackers. Main process only; returns the path there.
        """
        if not self.is_main:
            return None
        from PIL import Image
        from torchvision.utils import make_grid

        images = images.detach().float().clamp(0, 1).cpu()
        grid = make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=2, pad_value=1.0)
        folder = self.out_dir / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(path)
        path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": grid[None].numpy()}, step=step)
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [Image.fromarray(pixels)]}, step=step)
        return path

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoint(self, step: int, state: TrainingState) -> Path:
        """Write ``checkpoints/step-{step}`` atomically (main process), prune beyond the limit.

        Collective: every process must call it (their RNG states are gathered into the checkpoint).
        """
        folder = save_checkpoint(
            self.out_dir / "checkpoints", step, state, self.accelerator, self.cfg.train.checkpoints_total_limit
        )
        self.print(f"saved checkpoint {folder}")
        return folder

    def maybe_checkpoint(self, step: int, state: TrainingState) -> bool:
        """Checkpoint every ``train.checkpoint_every`` steps and at ``train.max_steps``; True if it did."""
        every = self.cfg.train.checkpoint_every
        if (every > 0 and step % every == 0) or step == self.cfg.train.max_steps:
            self.checkpoint(step, state)
            return True
        return False

    def restore(self, state: TrainingState) -> int:
        """Load ``resume`` (``latest`` or a path) into ``state`` on every process; the step to continue from.

        Without ``resume`` returns 0. Metrics logged after the restored step by the interrupted run
        are dropped from metrics.jsonl so it reads as one continuous run.
        """
        resume = self.cfg.resume
        if resume is None:
            return 0
        folder = find_checkpoint(resume, self.out_dir / "checkpoints")
        step, saved_processes = load_checkpoint(folder, state, self.accelerator)
        if saved_processes != self.num_processes:
            self.print(
                f"warning: {folder} was saved by {saved_processes} processes, this run has {self.num_processes}: "
                "the effective batch changes and the per-process random streams are not restored"
            )
        if self.is_main:
            self._truncate_metrics(step)
            self._progress.update(step - self._progress.n)
        self.print(f"resumed from {folder} at step {step}")
        return step

    def _truncate_metrics(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        self._metrics.close()
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", buffering=1)

    def checkpoints(self) -> list[Path]:
        """This run's checkpoint folders, oldest first."""
        return list_checkpoints(self.out_dir / "checkpoints")

    def finish(self) -> None:
        """Wait for every process, end the trackers, close metrics.jsonl and the progress bar."""
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        set_sdpa_backends(None, restore=self._sdpa_flags_before)


# --- optimisation helpers --------------------------------------------------------------------

# train.sdpa_backends names -> torch's switches for scaled_dot_product_attention's kernels.
SDPA_SWITCHES = {
    "flash": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "efficient": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "cudnn": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    "math": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
}


def set_sdpa_backends(backends: list[str] | None, restore: dict[str, bool] | None = None) -> dict[str, bool]:
    """Allow only ``backends`` for scaled_dot_product_attention (None: leave torch's switches as
    they are), or put back the switches of ``restore``. Returns the switches as they were."""
    before = {name: enabled() for name, (enabled, _) in SDPA_SWITCHES.items()}
    wanted = restore if restore is not None else (
        None if backends is None else {name: name in backends for name in SDPA_SWITCHES}
    )
    for name, on in (wanted or {}).items():
        SDPA_SWITCHES[name][1](on)
    return before


def build_optimizer(params, train: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over ``params`` (a list or a name -> Parameter dict); bitsandbytes AdamW8bit if asked."""
    params = list(params.values()) if isinstance(params, dict) else list(params)
    kwargs = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if train.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise UserError(
                "train.use_8bit_adam needs bitsandbytes on a CUDA machine: pip install 'diffalign[bnb]' "
                "or set train.use_8bit_adam=false"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSettings):
    """``train.lr_scheduler`` with ``warmup_steps`` over ``max_steps``; step it once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
    )


def sync_gradients(params, accelerator: Accelerator) -> None:
    """Average the gradients of ``params`` over all processes as one flat buffer (no-op for one).

    Call on every process after the last backward of an optimizer step. A parameter without a
    gradient counts as zeros, so every process takes part with the same buffer layout.
    """
    if accelerator.num_processes <= 1:
        return
    params = list(params.values()) if isinstance(params, dict) else list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= accelerator.num_processes
    offset = 0
    for param in params:
        n = param.numel()
        param.grad = flat[offset : offset + n].view_as(param).to(param.dtype).clone()
        offset += n


def clip_gradients(params, max_norm: float | None) -> float:
    """Clip the total gradient norm of ``params`` to ``max_norm`` (None: only measure); the norm before."""
    params = list(params.values()) if isinstance(params, dict) else list(params)
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm)


def maybe_enable_xformers(denoiser_or_pipe, train: TrainSettings) -> bool:
    """Turn on xformers attention when ``train.enable_xformers``; True if it did."""
    if not train.enable_xformers:
        return False
    if not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None:
        raise UserError(
            "train.enable_xformers needs CUDA and xformers: pip install 'diffalign[xformers]' "
            "or set train.enable_xformers=false"
        )
    denoiser_or_pipe.enable_xformers_memory_efficient_attention()
    return True
