"""Checkpoints: ``checkpoints/step-N/`` written atomically (a temp dir renamed into place), and
restored into the live objects of a :class:`TrainingState` so that a resumed run continues
bitwise where it stopped. :class:`diffalign.run.Run` decides when; this module knows the files."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator

from diffalign.errors import UserError
from diffalign.files import is_disk_full, tensors_bytes, torch_bytes, write_file

__all__ = [
    "TrainingState",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "read_saved_config",
    "set_aside_later_checkpoints",
    "nonfinite_state",
]


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
    ``process_tensors``: what differs between processes and is not an RNG (e.g. the samples a
    process drew for an update that spans several steps). Gathered to the main process and
    saved as one ``process-<rank>.safetensors`` per process (only when some process holds any);
    restoring replaces the dict's contents with this process's file, or empties it when the
    checkpoint was saved by another number of processes.
    ``grad_scaler``: fp16 loss scaling (its scale and growth count; the same on every process).
    """

    params: dict[str, torch.Tensor] | list[torch.Tensor] | tuple[Callable[[], dict], Callable[[dict], None]]
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    data_state: dict = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    process_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_scaler: torch.amp.GradScaler | None = None

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


def _gather_to_main(obj: Any, accelerator: Accelerator) -> list | None:
    """``obj`` from every process, in process order, on the main process; None elsewhere (collective)."""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes if accelerator.is_main_process else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Serialised in memory and written by diffalign.files.write_file (fsync'd, the user's umask, a
# full disk as errno.ENOSPC naming the file) rather than by torch/safetensors' own writers.
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_file(path, tensors_bytes(tensors))


def _save_torch(path: Path, obj: Any) -> None:
    write_file(path, torch_bytes(obj))


def _save_json(path: Path, obj: Any) -> None:
    write_file(path, json.dumps(obj, indent=2))


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)


def nonfinite_state(state: TrainingState) -> str | None:
    """What holds a NaN/inf value ("the weights", "the optimizer state"), or None if all is finite.

    A checkpoint of such a state could never be trained on from; :func:`save_checkpoint` refuses it."""
    def finite(tensors) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() or t.is_complex())

    if not finite(state.params_state().values()):
        return "the weights"
    if state.optimizer is not None and not finite(_tensors_in(state.optimizer.state_dict()["state"])):
        return "the optimizer state"
    if not finite(state.extra_tensors.values()):
        return "the running statistics (extra_tensors)"
    return None


def previous_checkpoint(folder: Path) -> Path | None:
    """The checkpoint before ``folder`` in its ``checkpoints/`` folder (None if it is the first)."""
    found = list_checkpoints(folder.parent)
    earlier = [p for p in found if _step_of(p) < _step_of(folder)] if STEP_DIR.match(folder.name) else found[:-1]
    return earlier[-1] if earlier else None


def _step_of(folder: Path) -> int:
    match = STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else -1


def _intact(folder: Path | None) -> str:
    return f"the previous checkpoint {folder} is intact" if folder is not None else "no earlier checkpoint exists"


def save_checkpoint(
    root: Path,
    step: int,
    state: TrainingState,
    accelerator: Accelerator,
    total_limit: int | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``root/step-{step}``: into ``root/.tmp-step-N-<uuid>``, fsync, rename (main process).

    A crash mid-save leaves earlier checkpoints intact and no ``step-N``; a full disk is a
    UserError naming the file and the previous checkpoint. ``config`` (the resolved run config)
    goes into ``state.json``, so a resume can tell what changed. Collective: every process calls
    it; their RNG states are gathered into ``rng.pt``, their ``process_tensors`` into
    ``process-<rank>.safetensors``. Callers check :func:`nonfinite_state` first (on every
    process, so that all of them stop together).
    """
    rng = _gather(_rng_state(state.generators), accelerator)
    own = {k: v.detach().to("cpu", copy=True) for k, v in state.process_tensors.items()}
    per_process = _gather_to_main(own, accelerator)
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-step-{step}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            try:
                _write_checkpoint_files(tmp, step, state, accelerator, rng, per_process, config)
            except OSError as err:
                if not is_disk_full(err):
                    raise
                where = final / Path(err.filename).name if err.filename else final
                done = list_checkpoints(root)
                then = "continue with resume=latest" if done else "start again"
                raise UserError(
                    f"disk full while writing {where}; {_intact(done[-1] if done else None)} "
                    f"(free some space, then {then})"
                ) from None
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


def _write_checkpoint_files(
    tmp: Path, step: int, state: TrainingState, accelerator: Accelerator, rng: list, per_process: list, config: dict | None
) -> None:
    _save_tensors(tmp / "lora.safetensors", state.params_state())
    if state.optimizer is not None:
        _save_torch(tmp / "optimizer.pt", state.optimizer.state_dict())
    if state.lr_scheduler is not None:
        _save_torch(tmp / "scheduler.pt", state.lr_scheduler.state_dict())
    _save_torch(tmp / "rng.pt", {"per_process": rng})
    _save_tensors(tmp / "extra.safetensors", state.extra_tensors)
    if any(per_process):
        for rank, tensors in enumerate(per_process):
            _save_tensors(tmp / f"process-{rank}.safetensors", tensors)
    info = {"step": step, "num_processes": accelerator.num_processes, "data_state": state.data_state}
    if state.grad_scaler is not None:
        info["grad_scaler"] = state.grad_scaler.state_dict()
    if config is not None:
        info["config"] = config
    _save_json(tmp / "state.json", info)
    _fsync(tmp)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A damaged or missing checkpoint file -> one UserError naming it and the checkpoint before."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # truncated zip/safetensors, bad JSON, missing file: all say the same
        folder = path.parent
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        earlier = previous_checkpoint(folder)
        fix = (f"resume from the previous checkpoint instead: resume={earlier}" if earlier is not None
               else "no earlier checkpoint exists; start without resume")
        raise UserError(f"checkpoint file {path} is damaged or unreadable ({reason[:120]}); {fix}") from None


def _load_torch(path: Path) -> Any:
    with _reading(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with _reading(path):
        return safetensors.torch.load_file(str(path))


def _load_json(path: Path) -> dict:
    with _reading(path):
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not {"step", "num_processes", "data_state"} <= set(info):
            raise ValueError("expected an object with step, num_processes and data_state")
        return info


def read_saved_config(folder: Path) -> dict | None:
    """The resolved config the run that wrote checkpoint ``folder`` ran with: from its
    ``state.json``, else (older checkpoints) from ``config.yaml`` of its run folder; None if neither."""
    info = _load_json(folder / "state.json")
    if isinstance(info.get("config"), dict):
        return info["config"]
    run_config = folder.parent.parent / "config.yaml"
    if run_config.is_file():
        import yaml

        with _reading(run_config):
            data = yaml.safe_load(run_config.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    return None


def set_aside_later_checkpoints(root: Path, step: int, final: Path | None = None) -> Path | None:
    """Move the checkpoints of ``root`` after ``step`` (and ``final``, the LoRA they led to) into
    ``root/abandoned-<time>/``: a run resumed from an older checkpoint starts a new line, and
    ``resume=latest`` must follow it. Returns that folder (None when nothing was later). Main
    process only."""
    later = [p for p in list_checkpoints(root) if _step_of(p) > step]
    if not later:
        return None
    aside = root / time.strftime("abandoned-%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    aside.mkdir()
    for folder in later:
        os.rename(folder, aside / folder.name)
    if final is not None and final.exists():
        os.rename(final, aside / final.name)
    _fsync(root)
    return aside


def load_checkpoint(folder: Path, state: TrainingState, accelerator: Accelerator) -> tuple[int, int]:
    """Restore ``folder`` into ``state`` (every process reads); returns (step, processes that saved it).

    A damaged or missing file is a UserError that names it and the checkpoint before it."""
    info = _load_json(folder / "state.json")
    state.load_params_state(_load_tensors(folder / "lora.safetensors"), folder)
    if state.optimizer is not None:
        state.optimizer.load_state_dict(_load_torch(folder / "optimizer.pt"))
    if state.lr_scheduler is not None:
        state.lr_scheduler.load_state_dict(_load_torch(folder / "scheduler.pt"))
    state.data_state.clear()
    state.data_state.update(info["data_state"])
    if state.grad_scaler is not None and "grad_scaler" in info:
        state.grad_scaler.load_state_dict(info["grad_scaler"])
    extra = _load_tensors(folder / "extra.safetensors")
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
    same_processes = len(per_process) == accelerator.num_processes
    if same_processes:
        _set_rng_state(per_process[accelerator.process_index], state.generators)
    own = folder / f"process-{accelerator.process_index}.safetensors"
    state.process_tensors.clear()
    if same_processes and own.is_file():
        state.process_tensors.update(_load_tensors(own))
    return info["step"], info["num_processes"]
