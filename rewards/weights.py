"""Finding reward weights on disk or on the hub, with one-line errors when they are missing.

Every scorer takes its weights from a published hub id by default or from a local path option. When
the hub is unreachable (offline machine, no cache) the user gets one line naming the hub id and the
option to set, never a stack of HTTP tracebacks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffalign.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def missing_weights_error(reward: str, source: str, option: str, hint: str = "/path/to/dir", cause: BaseException | None = None) -> UserError:
    """The one-line error for weights that cannot be loaded."""
    reason = f": {_first_line(cause)}" if cause is not None and not _looks_like_network(cause) else " (no network/hub access?)"
    return UserError(f"reward '{reward}': cannot load '{source}'{reason}; download it and set {option}={hint}")


def resolve_hub_file(spec: str, reward: str, option: str) -> str:
    """A local file path for ``spec``: an existing path, or ``"org/repo/filename"`` fetched from the hub.

    Raises:
        UserError: the path does not exist and the hub file cannot be fetched (offline, no cache).
    """
    if os.path.isfile(spec):
        return spec
    parts = spec.split("/")
    if len(parts) < 3 or spec.startswith((".", "/", "~")):
        raise UserError(f"reward '{reward}': {option}='{spec}' is not a file (expected a local path or 'org/repo/filename')")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename)
    except Exception as error:  # offline, missing cache, 404, gated repo: all the same to the user
        raise missing_weights_error(reward, spec, option, "/path/to/" + Path(filename).name, error) from error


def is_local_dir(spec: str) -> bool:
    """True when ``spec`` names an existing directory (rather than a hub id)."""
    return os.path.isdir(os.path.expanduser(spec))


def load_state_dict_file(path: str, reward: str, option: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a torch pickle with ``weights_only=True``, straight onto
    ``device`` (tensor by tensor, so a GPU reward never holds a whole copy in CPU memory).

    A checkpoint wrapped as ``{"state_dict": ...}`` (open_clip / HPS training format) is unwrapped
    and a DDP ``module.`` prefix removed.
    """
    device = torch.device(device)
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            if device.type == "meta":  # safetensors cannot read onto "meta"; read, then drop the data
                state = {key: value.to(device) for key, value in load_file(path).items()}
            else:
                state = load_file(path, device=str(device))
        else:
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise UserError(f"reward '{reward}': cannot read {option}='{path}' as a weights file: {_first_line(error)}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"reward '{reward}': {option}='{path}' does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def resolve_device(device: str | torch.device, reward: str) -> torch.device:
    """``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"meta"``, ... as a :class:`torch.device`; a bad name is a :class:`UserError`."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"reward '{reward}': device={device!r} is not a torch device; use e.g. cpu, cuda, cuda:1") from error


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str, reward: str) -> torch.dtype:
    """``"auto"``/None -> bfloat16 on CUDA, float32 elsewhere; names like ``"bf16"`` -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"reward '{reward}': unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_onto(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keywords that load a transformers model tensor by tensor straight onto ``device``,
    in ``dtype``. Hub kernels stay off (transformers 5.25 turns them on by default): they are code fetched
    from the Hub at load time, which diffalign runs only when asked, as with ``trust_remote_code``."""
    return {"dtype": dtype, "device_map": {"": device}, "use_kernels": False}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no parameter gradients: rewards are judges, never trained here."""
    module.eval()
    module.requires_grad_(False)
    return module


def _looks_like_network(error: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(error)}
    text = " ".join(str(e) for e in _chain(error)).lower()
    network = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "HTTPError",
               "RepositoryNotFoundError", "EntryNotFoundError", "GatedRepoError", "HfHubHTTPError"}
    return bool(names & network) or any(
        word in text for word in ("offline", "connection", "couldn't connect", "cannot find the requested files",
                                  "does not appear to have", "not a local folder", "hf_hub_offline", "network"))


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _first_line(error: Any) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
