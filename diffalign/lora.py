"""LoRA on the denoiser: add, reference-by-disabling, exact state, save/load in diffusers format.

The adapter is a peft LoRA added through diffusers' ``PeftAdapterMixin.add_adapter``, so the same
module tree serves as policy (adapter on) and reference (adapter off, :func:`adapter_disabled`)
with no second copy of the weights. :func:`save_lora` writes ``pytorch_lora_weights.safetensors``
through the pipeline class's ``save_lora_weights`` together with the peft adapter metadata, so a
stock ``pipe.load_lora_weights(dir)`` applies the trained ``alpha / rank`` scale::

    params = add_lora(pipe.unet, "sdxl", LoraSettings(rank=16, alpha=32))
    ...train...
    save_lora(pipe, pipe.unet, "runs/x/final", family="sdxl", method="diffusion_dpo")
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from diffalign.config import LoraSettings
from diffalign.errors import UserError
from diffalign.files import tensors_bytes, write_file
from diffalign.pipelines.base import adapter_disabled  # noqa: F401  (the reference model; re-exported)

FAMILIES = ("sd", "sdxl", "flux", "sd3")

# Attention projections for UNets (as in the diffusers SD/SDXL LoRA scripts); for FLUX the
# default of diffusers' train_dreambooth_lora_flux.py: joint-attention projections of both
# streams plus the feed-forwards of the double blocks (the attn.* names also hit the single blocks).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "sd": ["to_q", "to_k", "to_v", "to_out.0"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
    "flux": [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ],
    # SD3 / SD3.5: both streams' joint-attention projections, the list of diffusers'
    # train_dreambooth_lora_sd3.py and of Flow-GRPO / DiffusionNFT's SD3.5 training scripts.
    # (SD3.5's extra image self-attention ``attn2`` of its dual-attention blocks is left out, as there.)
    "sd3": [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ],
}

# Layer types peft's LoRA can wrap.
LORA_WRAPPABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
# The pipeline component that holds the denoiser; also the key prefix in the LoRA file.
DENOISER_COMPONENT = {"sd": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# safetensors header key holding diffalign's own metadata (JSON), next to diffusers' keys.
DIFFALIGN_METADATA_KEY = "diffalign"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def family_of_pipeline(pipeline_or_class) -> str:
    """``"sd"``, ``"sdxl"``, ``"flux"`` or ``"sd3"`` from a diffusers pipeline (or its class) by class name."""
    cls = pipeline_or_class if isinstance(pipeline_or_class, type) else type(pipeline_or_class)
    name = cls.__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd"
    raise ValueError(f"cannot tell the model family of {name}; pass family='sd' | 'sdxl' | 'flux' | 'sd3'")


def matching_module_names(model: torch.nn.Module, target: str) -> list[str]:
    """Names of modules that peft's list matching selects for ``target`` (equal, or ends in ``.target``)."""
    return [name for name, _ in model.named_modules() if name == target or name.endswith("." + target)]


def _linear_suffixes(model: torch.nn.Module, limit: int = 12) -> list[str]:
    """A few distinct short names of Linear layers, to show the user what exists."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            parts = [p for p in name.split(".") if not p.isdigit()]
            seen.setdefault(".".join(parts[-2:]), None)
    return list(seen)[:limit]


def add_lora(
    denoiser: torch.nn.Module, family: str, settings: LoraSettings, adapter_name: str = "default"
) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to ``denoiser``, freeze everything else, return the trainable (fp32) params.

    ``settings.target_modules`` None means ``DEFAULT_TARGET_MODULES[family]``. A target that matches
    no module (or no layer LoRA can wrap) is a UserError naming it. Cast the denoiser to its
    weight dtype *before* calling this: the LoRA weights are made fp32 here and must stay so.
    """
    from peft import LoraConfig

    _check_family(family)
    targets = list(settings.target_modules or DEFAULT_TARGET_MODULES[family])
    modules = dict(denoiser.named_modules())
    for target in targets:
        names = matching_module_names(denoiser, target)
        if not names:
            raise UserError(
                f"lora.target_modules: {target!r} matches no module of the {family} denoiser "
                f"({type(denoiser).__name__}); names that exist include: {', '.join(_linear_suffixes(denoiser))}"
            )
        if not any(isinstance(modules[n], LORA_WRAPPABLE) for n in names):
            raise UserError(
                f"lora.target_modules: {target!r} matches {type(modules[names[0]]).__name__} modules, which "
                f"LoRA cannot wrap; name Linear layers, e.g. {', '.join(_linear_suffixes(denoiser, 6))}"
            )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        target_modules=targets,
        lora_dropout=settings.dropout,
        init_lora_weights=True if settings.init_lora_weights == "default" else settings.init_lora_weights,
    )
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config, adapter_name=adapter_name)
    params = lora_parameters(denoiser, adapter_name)
    for param in params.values():
        param.data = param.data.float()
        param.requires_grad_(True)
    # add_adapter may have switched which adapters are trainable; only ours trains.
    trainable = set(map(id, params.values()))
    for param in denoiser.parameters():
        if id(param) not in trainable:
            param.requires_grad_(False)
    return list(params.values())


def lora_parameters(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters keyed by their peft state-dict names (adapter name removed).

    ``down_blocks.1.attentions.0...to_q.lora_A.weight`` -> Parameter; the same keys as peft's
    ``get_peft_model_state_dict(denoiser, adapter_name=...)``.
    """
    params = {}
    for name, param in denoiser.named_parameters():
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i].startswith("lora_") and parts[i + 1] == adapter_name:
                params[".".join(parts[: i + 1] + parts[i + 2 :])] = param
                break
    if not params:
        raise ValueError(f"{type(denoiser).__name__} has no LoRA adapter named {adapter_name!r}")
    return params


def lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's weights (peft names), for checkpoints and exact restores."""
    return {k: v.detach().clone() for k, v in lora_parameters(denoiser, adapter_name).items()}


def set_lora_state_dict(
    denoiser: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Copy ``state`` (from :func:`lora_state_dict`) into the adapter, bit for bit; keys must match exactly."""
    params = lora_parameters(denoiser, adapter_name)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match adapter {adapter_name!r}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise ValueError(f"LoRA state {name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
            param.copy_(state[name])


def _diffalign_version() -> str:
    try:
        return version("diffalign")
    except PackageNotFoundError:
        return "unknown"


def save_lora(
    pipeline_or_class,
    denoiser: torch.nn.Module,
    out_dir: str | os.PathLike,
    settings: LoraSettings | float | None = None,
    family: str | None = None,
    extra_metadata: dict[str, str] | None = None,
    *,
    method: str | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` that a stock ``load_lora_weights`` reads.

    ``pipeline_or_class``: the pipeline (or its class) whose ``save_lora_weights`` writes the file.
    ``family`` None: inferred from the pipeline class. Rank and alpha come from the adapter itself; ``settings`` (a LoraSettings, or an alpha) is
    checked against it. The peft adapter metadata goes into the header (diffusers reads it to apply
    alpha), and diffalign's own (version, method, family, rank, alpha, ``extra_metadata``) under
    the ``diffalign`` header key; see :func:`read_lora_metadata`. Written into a temporary folder
    and renamed into place, replacing an existing ``out_dir``.
    """
    from peft.utils import get_peft_model_state_dict

    pipeline_cls = pipeline_or_class if isinstance(pipeline_or_class, type) else type(pipeline_or_class)
    family = family or family_of_pipeline(pipeline_cls)
    _check_family(family)
    config = denoiser.peft_config[adapter_name]
    expected_alpha = settings.alpha if isinstance(settings, LoraSettings) else settings
    if expected_alpha is not None and float(expected_alpha) != float(config.lora_alpha):
        raise ValueError(f"alpha {expected_alpha} does not match the adapter's lora_alpha {config.lora_alpha}")
    component = DENOISER_COMPONENT[family]

    # peft's names (lora_A / lora_B) for every layer: diffusers' convert_state_dict_to_diffusers
    # renames only some projections (to_q.lora.down, ...), and a stock load of such a mixed file
    # reads it as peft format when its first key is, dropping the renamed layers (seen on FLUX
    # with targets on the double blocks only).
    layers = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
    ours = {
        "diffalign_version": _diffalign_version(),
        "method": method or "",
        "family": family,
        "rank": str(config.r),
        "alpha": str(float(config.lora_alpha)),
        **{str(k): str(v) for k, v in (extra_metadata or {}).items()},
    }

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    try:
        try:
            pipeline_cls.save_lora_weights(
                tmp,
                **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": config.to_dict()},
            )
        except Exception as err:  # safetensors reports a full disk as its own SafetensorError
            if "os error 28" in str(err) or "No space left" in str(err):
                raise OSError(errno.ENOSPC, "No space left on device", str(out / LORA_WEIGHT_NAME)) from None
            raise
        # Add our metadata to the header diffusers wrote (its adapter metadata stays as it is).
        path = tmp / LORA_WEIGHT_NAME
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
        header[DIFFALIGN_METADATA_KEY] = json.dumps(ours, sort_keys=True)
        tensors = safetensors.torch.load_file(str(path))
        path.unlink()  # safetensors writes 0600; written anew, the file follows the user's umask
        write_file(path, tensors_bytes(tensors, metadata=header))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex}"
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _lora_file(lora_dir: str | os.PathLike) -> Path:
    path = Path(lora_dir)
    path = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no LoRA at {lora_dir}: expected {LORA_WEIGHT_NAME} (written by diffalign train)")
    return path


def read_lora_metadata(lora_dir: str | os.PathLike) -> dict[str, str]:
    """diffalign's metadata of a saved LoRA (version, method, family, rank, alpha, extras)."""
    with safetensors.safe_open(str(_lora_file(lora_dir)), framework="pt") as f:
        raw = (f.metadata() or {}).get(DIFFALIGN_METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_lora_file(
    lora_dir: str | os.PathLike, denoiser: torch.nn.Module | None = None
) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """The one place a LoRA file is read: ``(component, state, adapter_metadata)``.

    ``lora_dir``: a folder holding ``pytorch_lora_weights.safetensors`` or the file itself; a
    kohya-format file (ComfyUI / kohya sd-scripts / A1111, or ``diffalign export-lora``) is
    converted to diffusers' layout for ``denoiser`` (its layer names depend on the model).
    ``component``: "unet" or "transformer" (the key prefix); ``state``: the diffusers-format
    tensors with that prefix; ``adapter_metadata``: the peft LoraConfig dict stored in the header
    (rank, alpha, target modules), or None for a file without it (alpha then equals rank).
    safetensors only, never pickle. Any other layout is a UserError naming the file.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    path = _lora_file(lora_dir)
    try:
        state = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (OSError, safetensors.SafetensorError) as err:
        raise UserError(f"{path} is not a readable safetensors LoRA file ({err})") from None
    from diffalign import kohya

    if kohya.is_kohya_state(state):
        return _kohya_as_diffusers(path, state, denoiser)
    prefixes = {key.split(".", 1)[0] for key in state}
    if len(prefixes) != 1 or next(iter(prefixes)) not in ("unet", "transformer"):
        raise UserError(f"{path} holds LoRA weights for {sorted(prefixes)}; expected only unet or transformer")
    raw_meta = header.get(LORA_ADAPTER_METADATA_KEY)
    return prefixes.pop(), state, (json.loads(raw_meta) if raw_meta else None)


def family_of_denoiser(denoiser: torch.nn.Module) -> str:
    """``"sd"``, ``"sdxl"``, ``"flux"`` or ``"sd3"`` from a denoiser's class (and SDXL's added time ids)."""
    name = type(denoiser).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("SD3"):
        return "sd3"
    return "sdxl" if getattr(denoiser.config, "addition_embed_type", None) == "text_time" else "sd"


def _kohya_as_diffusers(path: Path, state: dict[str, torch.Tensor], denoiser: torch.nn.Module | None):
    """A kohya-format file as ``(component, diffusers-format state, adapter metadata)`` for ``denoiser``:
    each layer's down/up/alpha become its peft A/B with rank and alpha per layer (fused FLUX/SD3
    layers split into their parts, see :mod:`diffalign.kohya`)."""
    from collections import Counter

    from diffalign import kohya

    if denoiser is None:
        raise UserError(f"{path} is a kohya-format LoRA; it can only be read for a given model (init_lora, sample --lora)")
    family = family_of_denoiser(denoiser)
    adapters = kohya.from_kohya(state, kohya.kohya_layout(denoiser, family), source=str(path))
    if not adapters:
        raise UserError(f"{path}: a kohya-format file with no LoRA layers")
    prefix = DENOISER_COMPONENT[family]
    tensors, ranks, alphas = {}, {}, {}
    for module, (a, b, scale) in sorted(adapters.items()):
        tensors[f"{prefix}.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.{module}.lora_B.weight"] = b.contiguous()
        ranks[module], alphas[module] = a.shape[0], scale * a.shape[0]
    (rank, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    metadata = {
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(adapters), "lora_dropout": 0.0,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
    }  # fmt: skip
    return prefix, tensors, {f"{prefix}.{key}": value for key, value in metadata.items()}


def load_lora(
    denoiser: torch.nn.Module, lora_dir: str | os.PathLike, adapter_name: str = "default"
) -> dict[str, torch.nn.Parameter]:
    """Load a LoRA saved by :func:`save_lora` (or a kohya-format file) into ``denoiser`` as adapter ``adapter_name``.

    Reads safetensors only (never pickle), with the stored rank and alpha. The loaded weights
    keep the file's dtype (fp32) and are frozen; returns them (peft names -> Parameter) so a
    trainer can ``requires_grad_(True)`` them to continue training.
    """
    prefix, state, metadata = read_lora_file(lora_dir, denoiser)
    denoiser.load_lora_adapter(state, prefix=prefix, adapter_name=adapter_name, metadata=metadata)
    params = lora_parameters(denoiser, adapter_name)
    for param in params.values():
        param.requires_grad_(False)
    return params


# The frozen copy of ``init_lora`` that is the reference with ``reference: init``.
INIT_ADAPTER = "init"


def add_trainable_lora(
    denoiser: torch.nn.Module,
    family: str,
    settings: LoraSettings,
    init_lora: str | os.PathLike | None = None,
    reference: str = "base",
) -> list[torch.nn.Parameter]:
    """The trainable adapter ``default`` of a run: fresh (:func:`add_lora`) or, with
    ``init_lora``, that LoRA's weights to continue training (config key ``init_lora``).

    A continued LoRA keeps the file's rank, alpha and layers; ``settings.rank`` / ``alpha``
    must equal them (a UserError says which to set). With ``reference="init"`` the file is
    loaded a second time as the frozen adapter ``INIT_ADAPTER``; the caller points the policy's
    ``reference_adapter`` at it. Returns the trainable (fp32) parameters; everything else is
    frozen and ``default`` is the active adapter.
    """
    _check_family(family)
    if init_lora is None:
        if reference != "base":
            raise UserError(f"reference: {reference!r} needs init_lora: PATH (the LoRA to continue from)")
        return add_lora(denoiser, family, settings)
    prefix, _, _ = read_lora_file(init_lora, denoiser)
    if prefix != DENOISER_COMPONENT[family]:
        raise UserError(
            f"init_lora: {init_lora} is a LoRA for a {prefix} (another model family); this {family} model needs "
            f"a {DENOISER_COMPONENT[family]} LoRA"
        )
    try:
        params = load_lora(denoiser, init_lora, "default")
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"init_lora: {init_lora} does not fit this {family} model's denoiser ({err})") from None
    config = denoiser.peft_config["default"]
    if (config.r, float(config.lora_alpha)) != (settings.rank, float(settings.alpha)):
        raise UserError(
            f"init_lora: {init_lora} is a rank-{config.r} LoRA with alpha {float(config.lora_alpha):g}, but lora.rank="
            f"{settings.rank} and lora.alpha={float(settings.alpha):g}; set lora.rank={config.r} lora.alpha="
            f"{float(config.lora_alpha):g} (a continued LoRA keeps its shape)"
        )
    if reference == "init":
        load_lora(denoiser, init_lora, INIT_ADAPTER)
    denoiser.set_adapter("default")
    denoiser.requires_grad_(False)
    for param in params.values():
        param.data = param.data.float()
        param.requires_grad_(True)
    return list(params.values())
