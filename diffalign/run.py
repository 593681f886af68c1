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
            run.backward(loss / cfg.train.gradient_accumulation_steps)   # fp16: through the loss scale
        step += 1
        # sync_gradients (mean over processes, one flat buffer), unscale, clip, step, zero:
        metrics = optimizer_step(run, params, optimizer, scheduler, cfg.train)  # diffalign.training
        run.log(step, {"loss": loss.item(), **metrics})
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
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed

from diffalign.checkpoint import TrainingState, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from diffalign.config import BaseRunConfig, TrainSettings, config_to_yaml
from diffalign.errors import UserError


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
    "set_sdpa_switches",
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
        # fp16 needs loss scaling (bf16 has fp32's range): Run.backward scales, optimizer_step unscales
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if cfg.train.mixed_precision == "fp16" else None
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

        # 4. process-wide settings, undone by finish(): attention kernels, stop-at-step-end signals
        allowed = cfg.train.sdpa_backends
        self._sdpa_before = set_sdpa_switches({name: name in allowed for name in SDPA_SWITCHES} if allowed else {})
        self._install_stop_handlers()

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

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the fp16 loss scale when there is one."""
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def print(self, msg: str) -> None:
        """Print on the main process only; also appended to ``log.txt`` (read by the report)."""
        self.accelerator.print(msg)
        if self.is_main and self.out_dir.is_dir():
            with open(self.out_dir / "log.txt", "a") as log:
                log.write(f"{msg}\n")

    def should_log(self, step: int) -> bool:
        """True every ``logging.log_every`` steps."""
        return step % self.cfg.logging.log_every == 0

    def should_sample(self, step: int) -> bool:
        """True every ``logging.sample_every`` steps (never when it is 0)."""
        every = self.cfg.logging.sample_every
        return every > 0 and step % every == 0

    def mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric (a float) averaged over the processes that report it. Collective: every
        process must call it. A process may lack a key (e.g. no untied pairs, so no loss)."""
        if self.num_processes == 1:
            return metrics
        reported = gather_object([metrics])
        keys = dict.fromkeys(key for m in reported for key in m)
        return {key: sum(m[key] for m in reported if key in m) / sum(key in m for m in reported) for key in keys}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl, send to trackers, update the bar.

        Tensors become floats; NaN/inf are written as null (metrics.jsonl stays strict JSON).
        Strings (such as the guard's verdict) go to metrics.jsonl only. Main process only; other
        processes return at once.
        """
        if not self.is_main:
            return
        texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items() if k not in texts}
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        record.update(texts)
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
        state.grad_scaler = self.grad_scaler
        folder = save_checkpoint(
            self.out_dir / "checkpoints", step, state, self.accelerator, self.cfg.train.checkpoints_total_limit
        )
        self.print(f"saved checkpoint {folder}")
        if step < self.cfg.train.max_steps:  # the last step's report is written by finish()
            self.write_report()
        return folder

    def maybe_checkpoint(self, step: int, state: TrainingState) -> bool:
        """Checkpoint every ``train.checkpoint_every`` steps and at ``train.max_steps``; True if it did.

        Called at the end of every step, it is also where a SIGINT/SIGTERM takes effect: the step
        is checkpointed and the run stops with a UserError saying how to resume (collective: one
        process's signal stops them all)."""
        every = self.cfg.train.checkpoint_every
        stop = self._stop_requested()
        if stop or (every > 0 and step % every == 0) or step == self.cfg.train.max_steps:
            folder = self.checkpoint(step, state)
            if stop:
                self.finish()
                raise UserError(f"stopped by {stop} after step {step}; {folder} holds it: continue with resume=latest")
            return True
        return False

    def _install_stop_handlers(self) -> None:
        """SIGINT/SIGTERM ask the run to stop at the end of the current step; a second one acts
        as it would have before (Ctrl-C twice interrupts at once)."""
        self._stop_signal: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread set handlers
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame) -> None:
        self._stop_signal = signal.Signals(signum).name
        signal.signal(signum, self._previous_handlers[signum])
        self.print(f"\n{self._stop_signal}: stopping after this step with a checkpoint (send it again to stop now)")

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_requested(self) -> str | None:
        """The signal that asked to stop, if any process got one."""
        if self.num_processes > 1:
            flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                return self._stop_signal or "a signal to another process"
            return None
        return self._stop_signal

    def restore(self, state: TrainingState) -> int:
        """Load ``resume`` (``latest`` or a path) into ``state`` on every process; the step to continue from.

        Without ``resume`` returns 0. Metrics logged after the restored step by the interrupted run
        are dropped from metrics.jsonl so it reads as one continuous run.
        """
        resume = self.cfg.resume
        if resume is None:
            return 0
        folder = find_checkpoint(resume, self.out_dir / "checkpoints")
        state.grad_scaler = self.grad_scaler
        step, saved_processes = load_checkpoint(folder, state, self.accelerator)
        if saved_processes != self.num_processes:
            self.print(
                f"warning: {folder} was saved by {saved_processes} processes, this run has {self.num_processes}: "
                "the effective batch changes, and per-process random streams and state (e.g. a GRPO round "
                "in progress) are not restored"
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

    def write_report(self) -> None:
        """(Re)write ``report.html`` (diffalign.report) on the main process. A failure to draw it
        is a warning: it never costs the run."""
        if not (self.is_main and self.cfg.logging.report):
            return
        try:
            from diffalign.report import write_report

            write_report(self.out_dir)
        except Exception as exc:  # noqa: BLE001  (matplotlib or a disk problem must not end training)
            self.accelerator.print(f"warning: {self.out_dir / 'report.html'} not written: {exc}")

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
        self.write_report()
        set_sdpa_switches(self._sdpa_before)
        self._restore_signal_handlers()


# --- optimisation helpers --------------------------------------------------------------------

# train.sdpa_backends names -> torch's switches for scaled_dot_product_attention's kernels.
SDPA_SWITCHES = {
    "flash": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "efficient": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "cudnn": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    "math": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
}


def set_sdpa_switches(switches: dict[str, bool]) -> dict[str, bool]:
    """Turn scaled_dot_product_attention's kernels (names of ``SDPA_SWITCHES``) on or off for
    the process; returns those switches as they were, to put them back with."""
    before = {name: SDPA_SWITCHES[name][0]() for name in switches}
    for name, on in switches.items():
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
