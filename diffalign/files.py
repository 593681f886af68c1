"""Writing files so that nothing is torn silently: whole-file writes that are flushed to disk,
follow the user's umask, and turn a full disk into one clear error.

``write_file(path, data)`` is what checkpoints, metrics and the final LoRA go through:
safetensors and ``torch.save`` serialise to bytes in memory first, because their own writers
report a full disk as an opaque ``RuntimeError`` (torch: "PytorchStreamWriter failed writing").
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

from diffalign.errors import UserError

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(err: BaseException) -> bool:
    """True for an OSError that says the disk (or the user's quota) is full."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` (created with mode 0666 minus the umask, like any user file) and
    fsync it. An error keeps its ``filename`` (a full disk: ``errno.ENOSPC``)."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.filename is None:
            err.filename = path
        raise


def write_file_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """``write_file`` into a temporary name next to ``path``, then rename over it: readers see the
    old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(fd: int, line: str, path: str | os.PathLike) -> None:
    """Append one line to an ``O_APPEND`` file descriptor and fsync, so a line on disk is whole
    unless the machine dies mid-write (and a reader drops a torn last line)."""
    try:
        _write_all(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    except OSError as err:
        if err.filename is None:
            err.filename = os.fspath(path)
        raise


def tensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes (tensors moved to the CPU, made contiguous)."""
    import safetensors.torch

    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def new_folder(out_dir: str | os.PathLike, command: str) -> Path:
    """``out_dir`` as a Path if it is new or an empty folder; else a one-line UserError, prefixed
    with ``command`` (e.g. "world build"), saying nothing was written. Check before the work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{command}: {out} is a file; --out takes a new or empty folder (nothing was written)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{command}: {out} exists and is not empty; choose a new folder (nothing was written)")
    return out
