"""Checks before a run touches anything, and what a resume would change.

:func:`check_inputs` catches what can be caught without loading a model (a missing model folder,
an unknown reward, a missing prompt file or manifest); :func:`changed_on_resume` compares a
checkpoint's recorded config with the one resuming it and refuses the keys the weights and random
streams depend on. Both raise a :class:`~diffalign.errors.UserError` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from diffalign.config import BaseRunConfig
from diffalign.errors import UserError

# Keys a resume cannot change: the weights and the random streams of the run depend on them.
FROZEN_ON_RESUME = ("method", "model", "seed", "lora.rank", "lora.alpha", "lora.target_modules",
                    "init_lora", "reference")
# Keys that are a property of the invocation, not of the training.
IGNORED_ON_RESUME = ("resume", "output_dir", "lora.init_lora_weights")  # (the weights come from the checkpoint)


# --- checks before a run touches anything ------------------------------------------------------


def _walk_config(model: BaseModel, prefix: str = ""):
    """(dotted key, value) of every field of ``model`` and its sections."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _walk_config(value, key + ".")
        else:
            yield key, value


def _looks_like_a_path(model: str) -> bool:
    """A local path rather than a hub id (``org/name``) or a model name such as ``tiny-sdxl``."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def check_inputs(cfg: BaseRunConfig) -> None:
    """What can be checked without loading anything, before the run touches a file: a local
    model folder exists, reward names and options are registered, prompt files and JSONL
    manifests exist. Each mistake is a UserError naming the key."""
    model = cfg.model
    if _looks_like_a_path(model) and not Path(model).expanduser().exists():
        raise UserError(f"model: no such folder {model}; point model at a diffusers folder, a hub id or a tiny-* model")
    for key, value in _walk_config(cfg):
        name = key.rsplit(".", 1)[-1]
        if value is None:
            continue
        if name in ("reward", "judge") and isinstance(value, (str, dict)):
            from diffalign.rewards import parse_reward_spec

            try:
                parse_reward_spec(value)
            except UserError as err:
                raise UserError(f"{key}: {err}") from None
        elif name == "prompts" and isinstance(value, (str, list)):
            from diffalign.data import load_prompts

            if isinstance(value, list) or not value.startswith("builtin:"):
                load_prompts(value, key=key)
        elif name == "source" and isinstance(value, str) and value.endswith(".jsonl") and not Path(value).is_file():
            raise UserError(f"{key}: manifest {value} not found")
        elif name == "source" and isinstance(value, str) and _looks_like_a_path(value) and not Path(value).expanduser().exists():
            raise UserError(f"{key}: no such file or folder {value}")


# --- resuming with another config --------------------------------------------------------------


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key not in ("reward", "judge"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_on_resume(saved: dict | None, cfg: BaseRunConfig, folder: Path) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in the checkpoint's run, value now)}`` for every setting a resume changes.

    A change of a key in :data:`FROZEN_ON_RESUME` (method, model, seed, LoRA shape) is a
    UserError naming it: the checkpoint cannot continue under it. ``saved`` None (a checkpoint
    that predates recorded configs): nothing to compare."""
    if saved is None:
        return {}
    now = cfg.model_dump(mode="json")
    if saved.get("method") != now["method"]:
        raise UserError(
            f"resume={cfg.resume}: {folder} is a checkpoint of a {saved.get('method')} run, and this config trains "
            f"{now['method']}; resume it with method: {saved.get('method')}, or start the {now['method']} run without resume"
        )
    before, after = _flat(saved), _flat(now)
    changes = {}
    for key in sorted(set(before) | set(after)):
        if key in IGNORED_ON_RESUME or before.get(key) == after.get(key):
            continue
        if key in FROZEN_ON_RESUME:
            raise UserError(
                f"resume={cfg.resume}: {key} was {before.get(key)!r} in the run that wrote {folder} and is "
                f"{after.get(key)!r} now; it cannot change mid-run: set {key}={before.get(key)!r} or start a new run"
            )
        changes[key] = (before.get(key, "(unset)"), after.get(key, "(unset)"))
    return changes
