"""``diffalign export-lora``: a trained LoRA for the tools people generate images with.

    diffalign export-lora runs/x/final --format kohya --out x.safetensors   # ComfyUI, kohya, A1111/Forge
    diffalign export-lora runs/x/final --merge --out merged/                # full diffusers model, no LoRA
    diffalign export-lora runs/x/final --merge --out unet.safetensors       # the merged denoiser, one file

The base model is read from the run's ``config.yaml`` (next to ``final/``), or given with
``--model``. Nothing existing is ever overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path

from diffalign.errors import UserError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="a LoRA folder written by diffalign train (runs/x/final), or its .safetensors file")
    parser.add_argument("--out", required=True, help="kohya: a new .safetensors file; --merge: a new folder, or a .safetensors file")
    parser.add_argument("--format", choices=["kohya"], default="kohya", help="LoRA file format (kohya: ComfyUI / A1111 / Forge)")
    parser.add_argument("--merge", action="store_true", help="write the base model with the LoRA merged in, instead of a LoRA file")
    parser.add_argument("--model", help="the base model (default: `model` of the run's config.yaml)")


def find_run_model(lora_path: Path) -> str | None:
    """``model`` of the nearest run ``config.yaml`` at or above ``lora_path`` (3 levels), or None."""
    import yaml

    folder = lora_path if lora_path.is_dir() else lora_path.parent
    for candidate in [folder, *list(folder.resolve().parents)[:3]]:
        config = candidate / "config.yaml"
        if config.is_file():
            data = yaml.safe_load(config.read_text()) or {}
            if isinstance(data, dict) and data.get("model"):
                return str(data["model"])
    return None


def read_trained_lora(lora: str | os.PathLike):
    """(tensors, diffalign metadata, rank, alpha) of a diffusers-format LoRA written by diffalign."""
    import safetensors
    import safetensors.torch

    from diffalign.lora import _lora_file, read_lora_metadata

    path = _lora_file(lora)
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    ours = read_lora_metadata(lora)
    adapter = json.loads(header.get("lora_adapter_metadata", "{}"))
    prefix = next((k.split(".", 1)[0] for k in adapter), "unet")
    if adapter.get(f"{prefix}.alpha_pattern") or adapter.get(f"{prefix}.rank_pattern"):
        raise UserError(f"{path}: per-layer ranks or alphas cannot be exported; export a LoRA with one rank and alpha")
    rank = int(ours.get("rank") or adapter.get(f"{prefix}.r") or 0)
    alpha = float(ours.get("alpha") or adapter.get(f"{prefix}.lora_alpha") or rank)
    if not rank:
        raise UserError(f"{path}: no rank in its metadata; is this a LoRA written by diffalign train?")
    return safetensors.torch.load_file(str(path)), ours, rank, alpha


def export_kohya(lora: str | os.PathLike, out: str | os.PathLike, model: str | None = None) -> Path:
    """Write the kohya-format file of a diffalign LoRA to the new file ``out``; returns its path."""
    from diffalign import kohya
    from diffalign.pipelines.loading import detect_family

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a kohya LoRA is one .safetensors file; name it e.g. {out.stem or 'model'}.safetensors")
    if out.exists():
        raise UserError(f"--out {out} exists; give a new path (export never overwrites a file)")
    state, ours, rank, alpha = read_trained_lora(lora)
    model = model or find_run_model(Path(lora))
    if model is None:
        raise UserError(f"{lora}: no run config.yaml found above it to name the base model; pass --model")
    family = ours.get("family") or detect_family(model)
    if family not in kohya.BASE_MODEL_VERSION:
        raise UserError(f"{lora}: unknown model family {family!r}; pass --model with the base model")
    layout = kohya.kohya_layout(kohya.denoiser_skeleton(model, family), family)
    tensors = kohya.to_kohya(kohya.split_diffusers_lora(state), alpha, layout, family)
    metadata = kohya.kohya_metadata(family, rank, alpha, model, out.stem, ours)
    return kohya.write_new_file(tensors, out, metadata)


def export_merged(lora: str | os.PathLike, out: str | os.PathLike, model: str | None = None) -> Path:
    """The base model with the LoRA fused into its weights: a diffusers folder, or (``out`` ends in
    ``.safetensors``) the merged denoiser's weights in one file. ``out`` must not exist."""
    import torch

    from diffalign import kohya
    from diffalign.lora import read_lora_metadata
    from diffalign.pipelines.loading import load_pipeline

    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; give a new path (export never overwrites)")
    model = model or find_run_model(Path(lora))
    if model is None:
        raise UserError(f"{lora}: no run config.yaml found above it to name the base model; pass --model")
    ours = read_lora_metadata(lora)
    pipe = load_pipeline(model, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        tensors = {k: v.detach().contiguous() for k, v in denoiser.state_dict().items()}
        meta = {"format": "pt", "diffalign": json.dumps({**ours, "merged_into": model}, sort_keys=True)}
        return kohya.write_new_file(tensors, out, meta)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    try:
        pipe.save_pretrained(tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_export(args: argparse.Namespace) -> int:
    """``diffalign export-lora``."""
    from diffalign.lora import read_lora_metadata

    negative = read_lora_metadata(args.lora).get("negative") == "true"
    if args.merge:
        out = export_merged(args.lora, args.out, args.model)
        print(f"wrote the merged model to {out}")
        if negative:
            print("note: this is a negative (NPO) LoRA; the merged model is the negative model for the unconditional branch")
        return 0
    out = export_kohya(args.lora, args.out, args.model)
    print(f"wrote {out} (kohya format{', negative NPO LoRA' if negative else ''}); in ComfyUI: models/loras/ + "
          "the LoraLoaderModelOnly node; in diffusers: pipe.load_lora_weights(path)")
    return 0
