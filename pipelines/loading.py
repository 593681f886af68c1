"""Load a model by name: an embedded tiny model, a shipped shapes-world model, a local diffusers
directory or a hub id.

Every kind goes through ``DiffusionPipeline.from_pretrained`` (the tiny models are built once
into a cache folder; the shapes models ship as diffusers folders under ``pipelines/shapes/``),
so the code path a test takes is the one a user's SDXL or FLUX takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from diffalign.errors import UserError
from diffalign.world import SHAPES_GUIDANCE

from .base import DiffusionPolicy
from .tiny import TINY_MODELS, TINY_RESOLUTION, copy_model_folder, tiny_model_dir

# The shapes world's pretrained models (``diffalign world build`` rebuilds them): 64 px images,
# 16 x 16 latents, and (FLUX, SD3) a 16-token T5 sequence.
SHAPES_MODELS = ("shapes-sd", "shapes-sdxl", "shapes-flux", "shapes-sd3")
SHAPES_ROOT = Path(__file__).resolve().parent / "shapes"
SHAPES_RESOLUTION = 64
SHAPES_T5_LENGTH = 16
EMBEDDED_MODELS = TINY_MODELS + SHAPES_MODELS

# Pipeline class name -> family. Each family has one policy class.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}
FAMILY_PIPELINES = {family: name for name, family in PIPELINE_FAMILIES.items()}


def shapes_model_dir(name: str) -> Path:
    """The shipped folder of shapes model ``name``; a :class:`UserError` says how to build it if absent."""
    folder = SHAPES_ROOT / name
    if not (folder / "model_index.json").is_file():
        family = name.removeprefix("shapes-")
        raise UserError(f"model {name!r} is not shipped in this install ({folder} is missing); build it with "
                        f"`diffalign world build --family {family} --out DIR` and set model=DIR")
    return folder


def export_embedded(name: str, out_dir: str | os.PathLike) -> Path:
    """Write embedded model ``name`` (tiny-* or shapes-*) to ``out_dir`` (new or empty) as a
    diffusers folder; FileExistsError for a non-empty one."""
    return copy_model_folder(Path(resolve_model_path(name)), out_dir)


def resolve_model_path(model: str) -> str:
    """A tiny model name becomes its cached directory, a shapes model its shipped folder; anything
    else is returned as given."""
    if model in TINY_MODELS:
        return str(tiny_model_dir(model))
    if model in SHAPES_MODELS:
        return str(shapes_model_dir(model))
    return model


def shapes_model_name(model: str) -> str | None:
    """``model`` if it is a shipped shapes model, or the shapes model a local folder holds: one that
    ``diffalign world build`` or ``export-tiny`` wrote (its ``manifest.json`` names it); else None.
    Such a folder gets the shapes models' defaults (64 px, a 16-token T5 sequence, CFG 1.5)."""
    if model in SHAPES_MODELS:
        return model
    manifest = Path(model) / "manifest.json"
    if model in TINY_MODELS or not manifest.is_file():
        return None
    try:
        name = json.loads(manifest.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in SHAPES_MODELS else None


def detect_family(model: str) -> str | None:
    """The family of a local diffusers directory from its ``model_index.json`` (None if unknown
    without loading, e.g. for a hub id)."""
    index = Path(resolve_model_path(model)) / "model_index.json"
    if not index.is_file():
        return None
    class_name = json.loads(index.read_text()).get("_class_name", "")
    return _family_of(class_name, model)


def _family_of(class_name: str, model: str) -> str:
    if class_name not in PIPELINE_FAMILIES:
        raise UserError(
            f"model {model!r} is a {class_name or 'pipeline of unknown class'}; diffalign supports "
            f"{', '.join(PIPELINE_FAMILIES)} (SD1.x/2.x, SDXL, FLUX.1, SD3/3.5)"
        )
    return PIPELINE_FAMILIES[class_name]


def load_pipeline(
    model: str,
    torch_dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
):
    """Load a stock diffusers pipeline for ``model`` (tiny name, local directory or hub id)."""
    from diffusers import DiffusionPipeline

    from diffalign.console import quiet_libraries

    quiet_libraries()  # no "Loading pipeline components" bars unless --verbose
    path = resolve_model_path(model)
    if model not in EMBEDDED_MODELS and os.path.isfile(path):
        raise UserError(
            f"model {model!r} is a single file; point model at a diffusers directory or hub id "
            "(convert single-file checkpoints with the pipeline's from_single_file + save_pretrained)"
        )
    detect_family(model)  # fail on an unsupported local pipeline before loading weights
    kwargs = {"dtype": torch_dtype, "revision": revision, "variant": variant}
    if FAMILY_PIPELINES.get(detect_family(model) or "") == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model {model!r}: cannot load it as a local diffusers directory or hub id ({reason}); "
            f"download it and set model=/path/to/dir, or use one of {', '.join(EMBEDDED_MODELS)}"
        ) from err
    _family_of(type(pipe).__name__, model)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_for(pipe, resolution: int | None = None, **options) -> DiffusionPolicy:
    """Wrap a loaded pipeline in its family's policy. ``options`` go to the policy class
    (FLUX: ``embedded_guidance``, ``max_sequence_length``; SD3: ``max_sequence_length``)."""
    from .flux import FluxPolicy
    from .sd import SDPolicy
    from .sd3 import SD3Policy
    from .sdxl import SDXLPolicy

    family = _family_of(type(pipe).__name__, "pipeline")
    policy_class = {"sd": SDPolicy, "sdxl": SDXLPolicy, "flux": FluxPolicy, "sd3": SD3Policy}[family]
    return policy_class(pipe, resolution=resolution, **options)


def load_policy(
    model: str,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    **options,
) -> DiffusionPolicy:
    """Load ``model`` and wrap it in its policy on ``device``. The tiny models default to their
    64 px resolution and (FLUX, SD3) a 32-token T5 sequence; the shapes models, and folders that
    hold one (:func:`shapes_model_name`), to 64 px and a 16-token sequence."""
    pipe = load_pipeline(model, torch_dtype=torch_dtype).to(device)
    if model in TINY_MODELS:
        resolution = resolution or TINY_RESOLUTION
        if model in ("tiny-flux", "tiny-sd3"):
            options.setdefault("max_sequence_length", 32)
    shapes = shapes_model_name(model)
    if shapes is not None:
        resolution = resolution or SHAPES_RESOLUTION
        if shapes in ("shapes-flux", "shapes-sd3"):
            options.setdefault("max_sequence_length", SHAPES_T5_LENGTH)
    return policy_for(pipe, resolution=resolution, **options)


def pipeline_call_defaults(model: str) -> dict:
    """Keyword arguments for a stock pipeline ``__call__`` that match what diffalign trained
    with: the tiny models' 64 px size and (FLUX, SD3) 32-token T5 sequence, the shapes models' (and
    their folders') 64 px, 16 tokens and CFG 1.5; nothing for real models."""
    shapes = shapes_model_name(model)
    if shapes is not None:
        kwargs = {"height": SHAPES_RESOLUTION, "width": SHAPES_RESOLUTION, "guidance_scale": SHAPES_GUIDANCE}
        if shapes in ("shapes-flux", "shapes-sd3"):
            kwargs["max_sequence_length"] = SHAPES_T5_LENGTH
        return kwargs
    if model not in TINY_MODELS:
        return {}
    kwargs = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
    if model in ("tiny-flux", "tiny-sd3"):
        kwargs["max_sequence_length"] = 32
    return kwargs
