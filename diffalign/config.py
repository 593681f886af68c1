"""YAML -> typed run config (pydantic v2), dotted command-line overrides, the method registry.

A run is described by one YAML mapping. ``method`` picks the config class (and the trainer) from
the registry; every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an
error with a suggestion instead of a silently ignored value::

    cfg = load_config("dpo.yaml", ["train.learning_rate=2e-5", "model=/ckpt/sdxl"])

Trainers subclass :class:`BaseRunConfig`, narrow ``method`` to a ``Literal`` and add their own
sections, then call :func:`register_method` when ``diffalign.trainers`` is imported.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffalign.errors import UserError
from diffalign.guard import GuardSettings

# --- the shared sections ---------------------------------------------------------------------


class LoraSettings(BaseModel):
    """The LoRA adapter trained on the denoiser (UNet or FLUX transformer)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, gt=0, description="LoRA rank r (inner dimension of the A/B factors).")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. None: equal to rank."
    )
    target_modules: list[str] | None = Field(
        None,
        description="Module names (suffixes) that get an adapter. None: the family default in "
        "diffalign.lora.DEFAULT_TARGET_MODULES (attention projections).",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input.")

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list trains nothing; name the modules (e.g. [to_q, to_v]) or use null for the family default")
        return value
    init_lora_weights: Literal["default", "gaussian"] = Field(
        "default",
        description="peft initialisation of A (B starts at zero either way): 'default' = Kaiming "
        "uniform, 'gaussian' = normal with std 1/rank.",
    )

    @model_validator(mode="after")
    def _alpha_defaults_to_rank(self) -> LoraSettings:
        if self.alpha is None:
            self.alpha = float(self.rank)
        return self


class TrainSettings(BaseModel):
    """Optimisation, precision and checkpointing; the same for every method."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(1000, gt=0, description="Number of optimizer steps to train for.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (after warmup).")
    batch_size: int = Field(1, gt=0, description="Samples (pairs, prompts...) per process per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Dtype of the frozen weights and autocast; LoRA weights stay fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute denoiser activations in backward.")
    offload_frozen: bool = Field(
        False, description="Keep the VAE and text encoders on the CPU while training (needs data.cache: the "
        "cached latents and embeddings replace them); sample grids and evaluations bring them back for their duration."
    )
    checkpoint_every: int = Field(
        500, ge=0, description="Save checkpoints/step-N every this many steps; 0 = only the final step."
    )
    checkpoints_total_limit: int | None = Field(
        None, gt=0, description="Keep at most this many checkpoints (oldest deleted); None = keep all."
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="diffusers.optimization.get_scheduler name."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; None = no clipping.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    use_8bit_adam: bool = Field(False, description="bitsandbytes AdamW8bit (CUDA only).")
    enable_xformers: bool = Field(False, description="xformers memory-efficient attention (CUDA only).")
    allow_tf32: bool = Field(True, description="Allow TF32 matmuls on Ampere+ GPUs.")
    sdpa_backends: list[Literal["flash", "efficient", "cudnn", "math"]] | None = Field(
        None,
        min_length=1,
        description="Attention kernels torch's scaled_dot_product_attention may use, e.g. [flash, efficient, math] "
        "to leave out cuDNN attention, whose backward has given NaN gradients in bf16 on H100/H200; null = torch's choice.",
    )
    skip_nonfinite_updates: int = Field(
        0,
        ge=0,
        description="Skip up to this many updates in a row whose gradient norm is NaN/inf (counted in the "
        "skipped_updates metric) before stopping; 0 = stop at the first. The weights never see the bad gradient.",
    )
    resolution: int | None = Field(
        None, gt=0, description="Training/sampling image size in pixels; None = the model's native size."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` as False; the user meant the string.
        return "no" if value is False else value

    @field_validator("sdpa_backends", mode="before")
    @classmethod
    def _one_backend_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


DEFAULT_SAMPLE_PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a watercolor painting of a lighthouse at dusk",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, studio lighting",
]


class LoggingSettings(BaseModel):
    """Metrics, trackers and sample grids."""

    model_config = ConfigDict(extra="forbid")

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Trackers besides metrics.jsonl: a list, one name, or 'none'.",
    )
    log_every: int = Field(1, gt=0, description="Write metrics every this many optimizer steps.")
    sample_every: int = Field(0, ge=0, description="Save a sample grid every this many steps; 0 = off.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS), min_length=1,
        description="Prompts of the sample grid (at least one).",
    )
    sample_seed: int = Field(0, ge=0, description="Seed of the sample grid's noise (same images every time).")
    sample_steps: int = Field(20, gt=0, description="Sampler steps for the sample grid.")
    sample_guidance_scale: float | None = Field(
        None, ge=0, description="CFG scale for samples; None = the family's default."
    )
    project_name: str = Field("diffalign", description="Tracker project name.")
    report: bool = Field(
        True, description="Write report.html (plots, sample grids, config, guard verdicts) at each checkpoint and the end."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_or_none(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return []
        if isinstance(value, str):
            return [value]
        return value


class BaseRunConfig(BaseModel):
    """What every run has. Trainers subclass it: ``method: Literal["x"]`` plus their sections."""

    model_config = ConfigDict(extra="forbid")
    # What one unit of train.batch_size is, for the printed batch arithmetic (pairs, prompts...).
    batch_unit: typing.ClassVar[str] = "samples"

    method: str = Field(description="Training method; picks the config class and trainer.")
    model: str = Field(
        "tiny-sdxl",
        description="Hub id, local diffusers directory, an embedded tiny model (tiny-sd | tiny-sdxl | tiny-flux | tiny-sd3) "
        "or a pretrained shapes-world model (shapes-sd | shapes-flux | ...).",
    )
    output_dir: str | None = Field(None, description="Run directory; default runs/<method>.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Global seed (python, numpy, torch): 0 to 2**32-1.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    init_lora: str | None = Field(
        None,
        description="Continue training this LoRA (a folder with pytorch_lora_weights.safetensors such as runs/x/final, "
        "or the file, or a kohya-format .safetensors as ComfyUI / kohya / A1111 use) instead of a fresh one; it keeps its rank, alpha and layers (lora.rank / lora.alpha must match).",
    )
    reference: Literal["base", "init"] = Field(
        "base",
        description="The reference model of the method's KL / ratio / base-drift terms: base = the base model "
        "(adapter off); init = base + init_lora, frozen (needs init_lora).",
    )
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation settings.")
    resume: str | None = Field(None, description="'latest' or a checkpoint directory to continue from.")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging settings.")
    guard: GuardSettings = Field(
        default_factory=GuardSettings, description="Reward-hacking guard (held-out reward + diversity; on with eval.reward)."
    )

    @model_validator(mode="after")
    def _default_output_dir(self) -> BaseRunConfig:
        if self.reference == "init" and self.init_lora is None:
            raise UserError("config error: reference: 'init' needs init_lora: PATH (the LoRA to continue from)")
        if self.output_dir is None:
            self.output_dir = f"runs/{self.method}"
        return self

    @model_validator(mode="after")
    def _guard_needs_a_heldout_reward(self) -> BaseRunConfig:
        if self.guard.enabled and getattr(getattr(self, "eval", None), "reward", None) is None:
            raise UserError(
                "config error: guard.enabled=true needs eval.reward (a held-out reward other than the training "
                "one); set eval.reward or guard.enabled=false"
            )
        return self


# --- method registry -------------------------------------------------------------------------

_METHODS: dict[str, tuple[type[BaseRunConfig], str]] = {}


def register_method(name: str, config_cls: type[BaseRunConfig], trainer_path: str) -> None:
    """Register method ``name``: its config class and its trainer as ``"module:Class"`` (imported lazily).

    Registering a name again replaces the earlier entry.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseRunConfig)):
        raise TypeError(f"config_cls for method {name!r} must subclass BaseRunConfig, got {config_cls!r}")
    if trainer_path.count(":") != 1:
        raise ValueError(f"trainer_path for method {name!r} must look like 'module:Class', got {trainer_path!r}")
    _METHODS[name] = (config_cls, trainer_path)


def _load_builtin_methods() -> None:
    """Import ``diffalign.trainers``, whose import registers the built-in methods."""
    importlib.import_module("diffalign.trainers")


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def _unknown_method(name: Any) -> UserError:
    known = list_methods()
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"config error: method: unknown method {name!r} (known: {', '.join(known) or 'none'}){hint}")


def get_method(name: str) -> tuple[type[BaseRunConfig], type]:
    """Return ``(config_cls, trainer_cls)`` of method ``name``; UserError if it is not registered."""
    _load_builtin_methods()
    if name not in _METHODS:
        raise _unknown_method(name)
    config_cls, trainer_path = _METHODS[name]
    module_name, class_name = trainer_path.split(":")
    trainer_cls = getattr(importlib.import_module(module_name), class_name)
    return config_cls, trainer_cls


# --- loading ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"config file {self.name}: duplicate key {key!r} at line {line} (first at line {seen[key]}); "
                    "keep one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"config file {path} line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save it as UTF-8") from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"config file {path}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise UserError(f"config file {path} must be a YAML mapping of keys to values (line 1: got {got})")
    return data


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Set dotted keys in ``data`` in place: ``train.learning_rate=2e-5``; values are parsed as YAML."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise UserError(f"bad override {item!r}: expected key=value, e.g. train.learning_rate=2e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. an unbalanced bracket in a prompt): keep the text
        node = data
        for depth, part in enumerate(parts[:-1]):
            part = part.strip()
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"bad override {item!r}: {where} is {child!r}, not a mapping")
            node = child
        node[parts[-1].strip()] = value
    return data


def load_config(path_or_dict: str | os.PathLike | dict, overrides: typing.Iterable[str] = ()) -> BaseRunConfig:
    """Read a YAML file (or take a dict), apply dotted overrides, pick the method's class, validate.

    Every mistake is a one-line :class:`UserError`.
    """
    if isinstance(path_or_dict, dict):
        data = copy.deepcopy(path_or_dict)
    else:
        data = _read_yaml(Path(path_or_dict))
    apply_overrides(data, overrides)

    method = data.get("method")
    if method is None:
        known = ", ".join(list_methods()) or "none registered"
        raise UserError(f"config error: method: required key is missing (known methods: {known})")
    _load_builtin_methods()
    if not isinstance(method, str) or method not in _METHODS:
        raise _unknown_method(method)
    config_cls = _METHODS[method][0]
    try:
        return config_cls.model_validate(data)
    except pydantic.ValidationError as exc:
        raise UserError(format_validation_error(exc, config_cls)) from None


def config_to_yaml(cfg: BaseRunConfig) -> str:
    """The resolved config as YAML; ``load_config`` of it gives an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def explain_config(config_cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of ``config_cls`` as ``key: type = default  # description`` lines (the config
    reference that ``diffalign explain METHOD`` prints)."""
    lines = []
    for name, field in config_cls.model_fields.items():
        key = f"{prefix}{name}"
        nested = [a for a in _unwrap(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            lines.append(f"{key}:  # {field.description or ''}".rstrip(" #"))
            lines.extend(explain_config(nested[0], key + "."))
            continue
        literals = _literal_values(field.annotation)
        if literals:
            type_name = " | ".join(map(str, literals))
            if any(typing.get_origin(m) in (list, tuple, set) for m in _unwrap(field.annotation)):
                type_name = f"list of {type_name}"
        else:
            type_name = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"{key}: {type_name} = {default}" + (f"  # {field.description}" if field.description else ""))
    return lines


# --- one-line validation errors --------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The member types of an annotation, looking through Optional/Union/list/dict/Annotated."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _unwrap(a)]
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return [annotation]


def _child(annotation: Any, key: Any) -> Any:
    """The annotation reached from ``annotation`` by loc element ``key`` (field name or index)."""
    for member in _unwrap(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(key, str) and key in member.model_fields:
                return member.model_fields[key].annotation
        elif typing.get_origin(member) in (list, tuple, set) and isinstance(key, int):
            return typing.get_args(member)[0] if typing.get_args(member) else Any
        elif typing.get_origin(member) is dict and isinstance(key, str):
            args = typing.get_args(member)
            return args[1] if len(args) == 2 else Any
    return None


def _literal_values(annotation: Any) -> list[Any]:
    values: list[Any] = []
    for member in _unwrap(annotation):
        if typing.get_origin(member) is Literal:
            values += list(typing.get_args(member))
        elif typing.get_origin(member) in (list, tuple, set):
            values += _literal_values(typing.get_args(member)[0] if typing.get_args(member) else None)
    return values


def _model_fields(annotation: Any) -> list[str]:
    return [
        f for m in _unwrap(annotation) if isinstance(m, type) and issubclass(m, BaseModel) for f in m.model_fields
    ]


def _walk(root: type[BaseModel], loc: tuple) -> tuple[str, Any, Any]:
    """Follow ``loc`` from ``root``: (dotted path, annotation at the end, annotation of the parent)."""
    path, annotation, parent = "", root, None
    for key in loc:
        child = _child(annotation, key)
        if child is None:
            if isinstance(key, str) and not _model_fields(annotation):
                continue  # a union tag such as 'int' or 'function-after[...]': not part of the path
            child = Any
        parent, annotation = annotation, child
        path += f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
    return path, annotation, parent


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(exc: pydantic.ValidationError, root: type[BaseModel]) -> str:
    """One line: ``config error: <key.path>: <what is wrong> (got <value>; allowed: <...>)``."""
    errors = exc.errors()
    # an unknown key first: a misspelt key also makes the key it stands for "missing"
    errors = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    path, annotation, parent = _walk(root, tuple(first["loc"]))
    kind = first["type"]
    if kind == "extra_forbidden":
        prefix, _, key = path.rpartition(".")
        allowed = _model_fields(parent)
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
        else:
            hint = f"allowed keys{' in ' + prefix if prefix else ''}: {', '.join(allowed)}"
        message = f"unknown key '{path}'; {hint}"
    elif kind == "missing":
        message = f"{path}: required key is missing"
    else:
        what = first["msg"][0].lower() + first["msg"][1:]
        detail = f"got {_show(first.get('input'))}"
        allowed = _literal_values(annotation)
        if allowed:
            detail += f"; allowed: {', '.join(str(v) for v in allowed)}"
        message = f"{path}: {what} ({detail})"
    others = {_walk(root, tuple(e["loc"]))[0] for e in errors[1:]} - {path}
    more = f" (+{len(others)} more)" if others else ""
    return f"config error: {message}{more}"


# --- derived batch arithmetic ----------------------------------------------------------------


def describe_batch(
    cfg: BaseRunConfig, num_processes: int, dataset_size: int | None, items_per_sample: str = "pairs"
) -> str:
    """The batch arithmetic a run prints at start-up, so nobody has to check it by hand.

    Example (batch 2, 8 processes, accumulation 4, 1000 steps, 6400 pairs)::

        batch: 2 pairs per process x 8 processes x 4 accumulation steps = 64 pairs per optimizer step
        training: 1000 optimizer steps = 64000 pairs seen
        data: 6400 pairs -> 100 optimizer steps per epoch, 10.00 epochs
    """
    train = cfg.train
    effective = train.batch_size * num_processes * train.gradient_accumulation_steps
    total = effective * train.max_steps
    lines = [
        f"batch: {train.batch_size} {items_per_sample} per process x {num_processes} processes x "
        f"{train.gradient_accumulation_steps} accumulation steps = {effective} {items_per_sample} per optimizer step",
        f"training: {train.max_steps} optimizer steps = {total} {items_per_sample} seen",
    ]
    if dataset_size is not None:
        steps_per_epoch = math.ceil(dataset_size / effective) if dataset_size else 0
        epochs = total / dataset_size if dataset_size else float("inf")
        lines.append(
            f"data: {dataset_size} {items_per_sample} -> {steps_per_epoch} optimizer steps per epoch, "
            f"{epochs:.2f} epochs"
        )
    return "\n".join(lines)
