"""What every trainer shares: processes, output folder, logging, checkpoint/resume.

The optimizer helpers (:func:`build_optimizer`, :func:`build_lr_scheduler`, :func:`sync_gradients`,
...) live in :mod:`diffalign.optim` and are re-exported here; the checks made before a run touches
anything, and on resume, in :mod:`diffalign.preflight`.

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

import atexit
import functools
import importlib.util
import json
import math
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed

from diffalign.checkpoint import (
    TrainingState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    nonfinite_state,
    read_saved_config,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from diffalign.config import BaseRunConfig, config_to_yaml
from diffalign.errors import RunStopped, UserError
from diffalign.files import append_line, is_disk_full, write_file_atomically
from diffalign.optim import (  # re-exported: trainers build their optimizer from here
    OPTIMIZER_KEYS,
    SDPA_SWITCHES,
    apply_train_settings,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    maybe_enable_xformers,
    set_sdpa_switches,
    sync_gradients,
)
from diffalign.preflight import changed_on_resume, check_inputs


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


# Runs alive in this process, so that the command line can close their progress bars (the
# error is then the last line printed) and drop an --overwrite staging folder after an error.
_LIVE_RUNS: list["Run"] = []

class Run:
    """One training run on this process: accelerator, run folder, metrics, samples, checkpoints.

    Attributes: ``accelerator``, ``device``, ``weight_dtype`` (for the frozen weights),
    ``out_dir``, ``is_main``, ``num_processes``, ``process_index``, ``last_checkpoint`` (the
    newest checkpoint of the line being trained: restored or saved; None before any).

    ``overwrite`` replaces an existing run folder without losing it to a failed start: the new
    run is written into ``.<name>.overwrite`` next to it, and swapped in (the old run deleted)
    only once its first checkpoint is on disk.
    """

    def __init__(self, cfg: BaseRunConfig, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.output_dir)
        self.last_checkpoint: Path | None = None
        # The newest checkpoint whose weights then gave a finite loss (see confirm_finite_loss):
        # after a NaN loss, the last checkpoint may hold the weights that gave it.
        self.last_good_checkpoint: Path | None = None
        report_to = list(cfg.logging.report_to)
        for name in report_to:
            if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
                raise UserError(
                    f"logging.report_to={name} needs the {name} package: pip install 'diffalign[{name}]' "
                    f"or remove {name} from logging.report_to"
                )
        # 0. everything that can be checked before touching the disk: inputs, the folder, resume
        check_inputs(cfg)
        self._replaces: Path | None = None  # the run folder an --overwrite replaces at its first checkpoint
        self._plan_out_dir(overwrite)
        self._resume_folder = find_checkpoint(cfg.resume, self.out_dir / "checkpoints") if cfg.resume else None
        self._resume_changes: dict[str, tuple[Any, Any]] = {}
        self._resumed_config: dict | None = None
        if self._resume_folder is not None:
            self._resumed_config = read_saved_config(self._resume_folder)
            self._resume_changes = changed_on_resume(self._resumed_config, cfg, self._resume_folder)

        # 1. processes, device, precision. One process may hold several Runs one after another
        # (tests, sweeps): drop the previous Run's precision settings; the process group stays.
        if hasattr(AcceleratorState, "_reset_state"):
            AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with=report_to or None, project_dir=str(self.out_dir)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _destroy_process_group_at_exit()
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
        self.skipped_updates = 0  # updates not applied for a non-finite loss or gradient norm (this session)
        self.skipped_in_a_row = 0

        # 2. run folder: every process decided from the same state; the main one makes it
        self._metrics_fd: int | None = None
        self._progress = None
        self._make_out_dir()
        _LIVE_RUNS.append(self)

        # 3. seeds, metrics file, trackers, progress bar
        set_seed(cfg.seed)
        if self.is_main:
            if self._resume_folder is None:
                self._write_config()  # a resume writes it once its checkpoint has loaded (restore)
            self._open_metrics()
            from tqdm.auto import tqdm

            self._progress = tqdm(total=cfg.train.max_steps, desc="train", unit="step", dynamic_ncols=True)
        if report_to:
            self.accelerator.init_trackers(cfg.logging.project_name, config=_flatten(cfg.model_dump(mode="json")))

        # 4. process-wide settings, undone by finish(): attention kernels, stop-at-step-end signals
        allowed = cfg.train.sdpa_backends
        self._sdpa_before = set_sdpa_switches({name: name in allowed for name in SDPA_SWITCHES} if allowed else {})
        self._install_stop_handlers()

    # --- the run folder ----------------------------------------------------------------------

    def _plan_out_dir(self, overwrite: bool) -> None:
        """Decide where the run writes; refuse what would lose work. Touches nothing."""
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
        init = self.cfg.init_lora
        if overwrite and non_empty and init is not None and Path(init).resolve().is_relative_to(out.resolve()):
            raise UserError(f"--overwrite would delete init_lora={init}, which this run continues from; "
                            "copy it out of the output_dir or choose another output_dir")
        if non_empty and not overwrite and resume is None:
            raise UserError(
                f"output_dir {out} exists and is not empty; pass --overwrite to replace it "
                "or resume=latest to continue"
            )
        if non_empty and overwrite:
            refuse_to_replace(out)
            self._replaces = out
            self.out_dir = out.parent / f".{out.name}.overwrite"

    def _make_out_dir(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            try:
                if self._replaces is not None and self.out_dir.exists():
                    shutil.rmtree(self.out_dir)  # the staging folder of an earlier --overwrite that failed
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _not_writable(self._replaces or self.out_dir, err) from None
        self.accelerator.wait_for_everyone()

    def _write_config(self) -> None:
        path = self.out_dir / "config.yaml"
        try:
            if self._resume_changes and path.is_file() and self._resume_folder is not None:
                # what ran until the resumed step stays on record next to what runs from it
                step = json.loads((self._resume_folder / "state.json").read_text())["step"]
                os.replace(path, self.out_dir / f"config.until-step-{step}.yaml")
            write_file_atomically(path, config_to_yaml(self.cfg))
        except OSError as err:
            if is_disk_full(err):
                raise UserError(f"disk full while writing {path}; nothing was trained") from None
            raise _not_writable(self._replaces or self.out_dir, err) from None

    def _swap_in(self) -> None:
        """Put the new run (its first checkpoint written) in place of the run --overwrite replaces."""
        if self._replaces is None:
            return
        staging, target = self.out_dir, self._replaces
        self.accelerator.wait_for_everyone()
        if self.is_main:
            trash = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
            had_old = target.exists()  # (the user may have moved it meanwhile)
            if had_old:
                os.rename(target, trash)
            os.rename(staging, target)
            if had_old:
                shutil.rmtree(trash, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.out_dir, self._replaces = target, None
        moved = lambda path: target / path.relative_to(staging) if path is not None and path.is_relative_to(staging) else path  # noqa: E731
        self.last_checkpoint, self.last_good_checkpoint = moved(self.last_checkpoint), moved(self.last_good_checkpoint)

    def abort(self) -> None:
        """After an error: close the progress bar and metrics.jsonl, and drop the staging folder
        of an --overwrite that never reached its first checkpoint (the old run stays as it was)."""
        if self in _LIVE_RUNS:
            _LIVE_RUNS.remove(self)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._close_metrics()
        if self._replaces is not None and self.is_main:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        self._restore_signal_handlers()

    # --- output --------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the fp16 loss scale when there is one."""
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def print(self, msg: str) -> None:
        """Print on the main process only (above the progress bar while it is shown); also
        appended to ``log.txt`` (read by the report)."""
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.write(msg)
        else:
            self.accelerator.print(msg)
        if self.out_dir.is_dir():
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

    def _open_metrics(self) -> None:
        self._metrics_path = self.out_dir / "metrics.jsonl"
        self._metrics_fd = os.open(self._metrics_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)

    def _close_metrics(self) -> None:
        if self._metrics_fd is not None:
            os.close(self._metrics_fd)
            self._metrics_fd = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl, send to trackers, update the bar.

        Each line is written whole and fsync'd (a resume drops a line torn by a crash). Tensors
        become floats; NaN/inf are written as null (metrics.jsonl stays strict JSON).
        Strings (such as the guard's verdict) go to metrics.jsonl only. Main process only; other
        processes return at once.
        """
        self._started = True
        if not self.is_main:
            return
        texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items() if k not in texts}
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        record.update(texts)
        try:
            append_line(self._metrics_fd, json.dumps(record), self._metrics_path)
        except OSError as err:
            if is_disk_full(err):
                raise UserError(f"disk full while writing {self._metrics_path}; {self._intact()}") from None
            raise
        if self.accelerator.trackers:
            self.accelerator.log(values, step=step)
        self._progress.update(step - self._progress.n)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "reward", "accuracy", "lr")}
        self._progress.set_postfix(shown or {k: f"{v:.4g}" for k, v in list(values.items())[:2]}, refresh=False)

    def _intact(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the previous checkpoint {self.last_checkpoint} is intact (continue with resume=latest)"

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
        pixels = self.write_image(path, grid, "\n".join(prompts) + "\n")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": grid[None].numpy()}, step=step)
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [Image.fromarray(pixels)]}, step=step)
        return path

    def write_image(self, path: Path, grid: torch.Tensor, caption: str | None = None):
        """Save ``grid: [3, H, W] in [0, 1]`` as the PNG ``path`` (and ``caption`` next to it as
        .txt); a full disk is a one-line error naming the intact checkpoint. Returns the pixels."""
        from PIL import Image

        pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        try:
            Image.fromarray(pixels).save(path)
            if caption is not None:
                path.with_suffix(".txt").write_text(caption)
        except OSError as err:
            if is_disk_full(err):
                raise UserError(f"disk full while writing {path}; {self._intact()}") from None
            raise
        return pixels

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoint(self, step: int, state: TrainingState) -> Path:
        """Write ``checkpoints/step-{step}`` atomically (main process), prune beyond the limit.

        Refuses (a UserError naming the last finite checkpoint) a state holding NaN/inf, which
        could never be trained on from. The first checkpoint of an --overwrite swaps the new run
        in place of the old one. Collective: every process must call it (their RNG states are
        gathered into the checkpoint).
        """
        self._started = True
        bad = nonfinite_state(state)  # the same on every process: weights and optimizer state are synced
        if bad is not None:
            where = (f"the last checkpoint with finite weights is {self.last_checkpoint}: resume from it "
                     f"(resume={self.last_checkpoint}) with a lower train.learning_rate"
                     if self.last_checkpoint is not None else "no checkpoint was written yet: start again")
            raise UserError(
                f"{bad} became NaN/inf by step {step}, so step {step} was not checkpointed; {where} "
                "(or set train.max_grad_norm / train.skip_nonfinite_updates)"
            )
        state.grad_scaler = self.grad_scaler
        folder = save_checkpoint(
            self.out_dir / "checkpoints", step, state, self.accelerator, self.cfg.train.checkpoints_total_limit,
            config=self.cfg.model_dump(mode="json"),
        )
        self.last_checkpoint = folder
        self._swap_in()
        self.print(f"saved checkpoint {self.last_checkpoint}")
        if step < self.cfg.train.max_steps:  # the last step's report is written by finish()
            self.write_report()
        return self.last_checkpoint

    def confirm_finite_loss(self) -> None:
        """Called by ``optimizer_step`` after a finite loss: the weights of the last checkpoint
        (those this loss was computed with, or earlier) are good to resume from."""
        self.last_good_checkpoint = self.last_checkpoint

    def resume_advice(self, loss_finite: bool = True) -> str:
        """Which checkpoint to resume from after a non-finite loss or gradient, as a clause."""
        last, good = self.last_checkpoint, self.last_good_checkpoint
        if loss_finite or last == good:
            if last is None:
                return "no checkpoint was written yet: start again"
            return f"resume from the last checkpoint, which is finite (resume={last})"
        if good is not None:
            return (f"resume from {good} (resume={good}), the last checkpoint after which the loss stayed finite "
                    f"({last} holds the weights that gave this loss)")
        return f"start again ({last} holds the weights that gave this loss)"

    def maybe_checkpoint(self, step: int, state: TrainingState) -> bool:
        """Checkpoint every ``train.checkpoint_every`` steps and at ``train.max_steps``; True if it did.

        Called at the end of every step, it is also where a SIGINT/SIGTERM takes effect: the step
        is checkpointed and the run stops with a :class:`RunStopped` saying how to resume (exit
        status 75; collective: one process's signal stops them all)."""
        every = self.cfg.train.checkpoint_every
        stop = self._stop_requested()
        if stop or (every > 0 and step % every == 0) or step == self.cfg.train.max_steps:
            folder = self.checkpoint(step, state)
            if stop:
                self.finish()
                raise RunStopped(f"stopped by {stop} after step {step}; {folder} holds it: continue with resume=latest")
            return True
        return False

    def _install_stop_handlers(self) -> None:
        """SIGINT/SIGTERM ask the run to stop at the end of the current step; a second one acts
        as it would have before (Ctrl-C twice interrupts at once)."""
        self._stop_signal: str | None = None
        self._started = False  # set by restore() (or the first log/checkpoint): training has begun
        self._previous_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread set handlers
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame) -> None:
        signal.signal(signum, self._previous_handlers[signum])
        if not self._started:  # still loading (model, data, rewards): nothing to checkpoint, stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name
        self.print(f"\n{self._stop_signal}: stopping after this step with a checkpoint (send it again to stop now)")

    def _restore_signal_handlers(self) -> None:
        for signum, handler in getattr(self, "_previous_handlers", {}).items():
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

        Without ``resume`` returns 0. What the resumed run logged after the restored step is
        dropped from metrics.jsonl, so it reads as one continuous run; checkpoints after that
        step (and the ``final/`` they led to) are moved to ``checkpoints/abandoned-<time>/``, so
        ``resume=latest`` follows the line trained now. Changed settings are applied: the
        optimizer and schedule take the config's ``train.*`` values (printed).
        """
        self._started = True
        if self._resume_folder is None:
            return 0
        folder = self._resume_folder
        state.grad_scaler = self.grad_scaler
        step, saved_processes = load_checkpoint(folder, state, self.accelerator)
        self.last_checkpoint = folder
        if saved_processes != self.num_processes:
            self.print(
                f"warning: {folder} was saved by {saved_processes} processes, this run has {self.num_processes}: "
                "the effective batch changes, and per-process random streams and state (e.g. a GRPO round "
                "in progress) are not restored"
            )
        changed_train = [key for key in self._resume_changes if key.startswith("train.") and key[6:] in OPTIMIZER_KEYS]
        if changed_train:
            apply_train_settings(state.optimizer, state.lr_scheduler, self.cfg.train)
        for key, (old, new) in self._resume_changes.items():
            self.print(f"resume: {key} changed {old!r} -> {new!r}; applied from step {step + 1}")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self._write_config()
            self._truncate_metrics(step)
            aside = set_aside_later_checkpoints(self.out_dir / "checkpoints", step, self.out_dir / "final")
            if aside is not None:
                self.print(f"resumed from step {step}, older than the newest checkpoint: the later ones "
                           f"(and final/) moved to {aside}; resume=latest follows this run from now on")
            self._progress.update(step - self._progress.n)
        self.accelerator.wait_for_everyone()
        self.print(f"resumed from {folder} at step {step}")
        return step

    def _truncate_metrics(self, step: int) -> None:
        """Keep metrics.jsonl's lines up to ``step``; a torn or damaged line is dropped with a note."""
        path = self._metrics_path
        kept, dropped = [], []
        lines = path.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                dropped.append(number)
                continue
            if record["step"] <= step:
                kept.append(raw.decode("utf-8"))
        if dropped:
            numbered = [number for number, raw in enumerate(lines, start=1) if raw.strip()]
            what = "its torn last line" if dropped == numbered[-1:] else f"damaged line(s) {', '.join(map(str, dropped))}"
            self.print(f"note: {path}: dropped {what} (written when the run was interrupted)")
        self._close_metrics()
        write_file_atomically(path, "".join(line + "\n" for line in kept))
        self._open_metrics()

    def write_report(self) -> None:
        """(Re)write ``report.html`` (diffalign.report) on the main process. A failure to draw it
        is a warning: it never costs the run."""
        if not (self.is_main and self.cfg.logging.report):
            return
        try:
            from diffalign.report import write_report

            write_report(self.out_dir)
        except Exception as exc:  # noqa: BLE001  (matplotlib or a disk problem must not end training)
            from diffalign.console import warn_once  # once per run, not at every checkpoint

            warn_once(f"{self.out_dir / 'report.html'} not written: {exc}")

    def checkpoints(self) -> list[Path]:
        """This run's checkpoint folders, oldest first."""
        return list_checkpoints(self.out_dir / "checkpoints")

    def finish(self) -> None:
        """Wait for every process, end the trackers, close metrics.jsonl and the progress bar."""
        self._swap_in()  # a run that never checkpointed (no steps) still replaces what --overwrite named
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self._close_metrics()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.write_report()
        set_sdpa_switches(self._sdpa_before)
        self._restore_signal_handlers()
        if self in _LIVE_RUNS:
            _LIVE_RUNS.remove(self)


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Register (once per process) an exit hook that destroys the process group while the
    interpreter is still whole. Without it, gloo's worker threads can outlive finalisation and the
    process dies with "terminate called without an active exception" (SIGABRT) after a run that
    succeeded, which the launcher reports as a failed rank."""
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def abort_live_runs() -> None:
    """For the command line, after an error: close every live run's progress bar (so that the
    error is the last line printed) and drop unfinished --overwrite staging folders."""
    for run in list(_LIVE_RUNS):
        run.abort()


def last_checkpoint_of_live_runs() -> Path | None:
    """The newest checkpoint of the run this process is training (None without one)."""
    return next((run.last_checkpoint for run in reversed(_LIVE_RUNS) if run.last_checkpoint is not None), None)


def _not_writable(folder: Path, err: OSError) -> UserError:
    reason = err.strerror or type(err).__name__
    return UserError(f"output_dir {folder} is not writable ({reason}); choose another output_dir or fix its permissions")


def refuse_to_replace(out: Path) -> None:
    """UserError unless ``out`` is a diffalign run folder that --overwrite may replace: never the
    current folder, the home folder, a folder above the current one, or a folder without config.yaml."""
    resolved, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    what = None
    if resolved == cwd:
        what = "the current folder"
    elif resolved == home:
        what = "your home folder"
    elif cwd.is_relative_to(resolved):
        what = "a folder above the current one"
    if what is not None:
        raise UserError(f"output_dir {out} is {what}; --overwrite never replaces it: set output_dir to a run folder such as runs/NAME")
    if not (out / "config.yaml").is_file():
        raise UserError(
            f"output_dir {out} is not a diffalign run (no config.yaml), so --overwrite will not replace it; "
            "choose another output_dir, or move its files away yourself"
        )
