"""Kohya-format LoRA files, the format ComfyUI, kohya sd-scripts and A1111/Forge load, and back.

A kohya file names each adapted layer of the base model's *original* checkpoint with
``lora_unet_`` + its module path, ``.`` written ``_``, and holds three tensors per layer::

    lora_unet_<layer>.lora_down.weight   [rank, in]     (peft's lora_A)
    lora_unet_<layer>.lora_up.weight     [out, rank]    (peft's lora_B)
    lora_unet_<layer>.alpha              scalar         the update is up @ down * alpha / rank

Layer names per family, the ones kohya sd-scripts writes:

* SD1.x/2.x: the diffusers UNet's module names (``lora_unet_down_blocks_1_attentions_0_...``).
* SDXL: the original (sgm) UNet's names (``lora_unet_input_blocks_4_1_transformer_blocks_0_...``).
* SD3/3.5: the MMDiT's names (``lora_unet_joint_blocks_0_x_block_attn_qkv``), q, k, v fused as in FLUX.
* FLUX.1: the BFL transformer's names (``lora_unet_double_blocks_0_img_attn_qkv``). BFL fuses
  q, k and v into one ``qkv`` layer (single blocks: q, k, v and the MLP input into ``linear1``),
  so the parts' LoRAs become one LoRA of the fused layer: ``down`` stacks each part's ``A``,
  ``up`` is block-diagonal (zeros for a part that was not trained), rank and alpha both grow by
  the number of parts, and ``up @ down * alpha / rank`` is exactly the parts' updates stacked.

The file's header carries kohya's ``ss_*`` metadata (``ss_network_dim``, ``ss_network_alpha``,
``ss_base_model_version``, ...) and diffalign's own JSON (method, family, the NPO ``negative``
marker) under the ``diffalign`` key, as in diffalign's diffusers-format files.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
from torch import Tensor

from diffalign.errors import UserError

KOHYA_PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# kohya's ss_base_model_version and ss_network_module values per family.
BASE_MODEL_VERSION = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}
NETWORK_MODULE = {"sd": "networks.lora", "sdxl": "networks.lora", "flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}

# The denoiser's class and its folder in a diffusers model, per family.
DENOISER_CLASS = {
    "sd": ("UNet2DConditionModel", "unet"), "sdxl": ("UNet2DConditionModel", "unet"),
    "flux": ("FluxTransformer2DModel", "transformer"), "sd3": ("SD3Transformer2DModel", "transformer"),
}  # fmt: skip

# FLUX: diffusers name inside transformer_blocks.N / single_transformer_blocks.N -> (BFL layer, part).
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0),
}  # fmt: skip
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}  # fmt: skip
# SD3 / SD3.5: diffusers name inside transformer_blocks.N -> (MMDiT layer in joint_blocks.N, part).
_SD3_BLOCK = {
    "attn.to_q": ("x_block_attn_qkv", 0), "attn.to_k": ("x_block_attn_qkv", 1), "attn.to_v": ("x_block_attn_qkv", 2),
    "attn.to_out.0": ("x_block_attn_proj", 0),
    "attn.add_q_proj": ("context_block_attn_qkv", 0), "attn.add_k_proj": ("context_block_attn_qkv", 1),
    "attn.add_v_proj": ("context_block_attn_qkv", 2), "attn.to_add_out": ("context_block_attn_proj", 0),
    "attn2.to_q": ("x_block_attn2_qkv", 0), "attn2.to_k": ("x_block_attn2_qkv", 1), "attn2.to_v": ("x_block_attn2_qkv", 2),
    "attn2.to_out.0": ("x_block_attn2_proj", 0),
    "ff.net.0.proj": ("x_block_mlp_fc1", 0), "ff.net.2": ("x_block_mlp_fc2", 0),
    "ff_context.net.0.proj": ("context_block_mlp_fc1", 0), "ff_context.net.2": ("context_block_mlp_fc2", 0),
}  # fmt: skip
_FLUX_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
}  # fmt: skip


def _sdxl_sgm_name(name: str, layers_per_block: int) -> str | None:
    """diffusers SDXL UNet module name -> the sgm UNet's name (attention blocks only), or None."""
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{block * (layers_per_block + 1) + layer}.1.{rest}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{match[1]}"
    return None


def kohya_layer(name: str, family: str, layers_per_block: int = 2) -> tuple[str, int] | None:
    """(kohya layer name, part index in it) of the diffusers module ``name``; None if it has none.

    ``layers_per_block``: the SDXL UNet's (2 for SDXL base), to number the sgm blocks.
    """
    if family == "sd":
        original = name
    elif family == "sdxl":
        original = _sdxl_sgm_name(name, layers_per_block)
    elif family == "flux":
        if match := re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", name):
            table, kind = (_FLUX_SINGLE, "single_blocks") if match[1] else (_FLUX_DOUBLE, "double_blocks")
            if match[3] not in table:
                return None
            layer, part = table[match[3]]
            return f"{KOHYA_PREFIX}{kind}_{match[2]}_{layer}", part
        return (f"{KOHYA_PREFIX}{_FLUX_GLOBAL[name]}", 0) if name in _FLUX_GLOBAL else None
    elif family == "sd3":
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        if match is None or match[2] not in _SD3_BLOCK:
            return None
        layer, part = _SD3_BLOCK[match[2]]
        return f"{KOHYA_PREFIX}joint_blocks_{match[1]}_{layer}", part
    else:
        raise ValueError(f"kohya export has no layer names for family {family!r}")
    return (KOHYA_PREFIX + original.replace(".", "_"), 0) if original is not None else None


# A layout: kohya layer -> its parts in order, each (diffusers module name, output width).
Layout = dict[str, list[tuple[str, int]]]


def kohya_layout(denoiser: torch.nn.Module, family: str) -> Layout:
    """Every LoRA-able layer of ``denoiser`` (real or on the meta device) by its kohya name."""
    layers_per_block = getattr(denoiser.config, "layers_per_block", 2)
    parts: dict[str, dict[int, tuple[str, int]]] = {}
    for name, module in denoiser.named_modules():
        module = getattr(module, "base_layer", module)  # a layer peft has wrapped: its original layer
        if "lora_" in name or name.endswith(".base_layer") or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        mapped = kohya_layer(name, family, layers_per_block)
        if mapped is not None:
            width = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
            parts.setdefault(mapped[0], {})[mapped[1]] = (name, width)
    return {layer: [by_index[i] for i in sorted(by_index)] for layer, by_index in parts.items()}


def denoiser_skeleton(model: str, family: str) -> torch.nn.Module:
    """The base model's denoiser built from its config on the meta device (no weights are read)."""
    import diffusers

    from diffalign.pipelines.loading import resolve_model_path

    class_name, subfolder = DENOISER_CLASS[family]
    cls = getattr(diffusers, class_name)
    try:
        config = cls.load_config(resolve_model_path(model), subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model {model!r}: cannot read its {subfolder} config ({str(err).splitlines()[0]}); pass --model "
            "with the base model's diffusers folder or hub id"
        ) from None
    with torch.device("meta"):
        return cls.from_config(config)


def split_diffusers_lora(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{prefix.module.lora.down.weight | lora_A.weight: A, ...up/lora_B: B}`` -> ``{module: (A, B)}``
    (the ``unet.`` / ``transformer.`` prefix removed)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for suffix, side in ((".lora.down.weight", "A"), (".lora_A.weight", "A"), (".lora.up.weight", "B"), (".lora_B.weight", "B")):
            if key.endswith(suffix):
                module = key[: -len(suffix)].split(".", 1)[1]
                pairs.setdefault(module, {})[side] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in a diffusers-format LoRA")
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def to_kohya(adapters: dict[str, tuple[Tensor, Tensor]], alpha: float, layout: Layout, family: str) -> dict[str, Tensor]:
    """Kohya tensors from the adapter of every module (``{module: (A [r, in], B [out, r])}``, one
    ``alpha`` for all, as diffalign trains them). A module with no kohya name is a UserError."""
    layer_of = {name: (layer, index) for layer, parts in layout.items() for index, (name, _) in enumerate(parts)}
    unmapped = sorted(set(adapters) - set(layer_of))
    if unmapped:
        raise UserError(
            f"export-lora: {len(unmapped)} LoRA layers have no kohya name for {family} (e.g. {unmapped[0]}); "
            "kohya export covers the attention and MLP layers (lora.target_modules' defaults)"
        )
    out: dict[str, Tensor] = {}
    for layer in sorted({layer_of[m][0] for m in adapters}):
        parts = layout[layer]
        present = [(i, adapters[name]) for i, (name, _) in enumerate(parts) if name in adapters]
        ranks = {a.shape[0] for _, (a, _) in present}
        if len(ranks) != 1:
            raise ValueError(f"{layer}: its parts have LoRA ranks {sorted(ranks)}; a fused layer needs one rank")
        rank, count = ranks.pop(), len(parts)
        if count == 1:
            down, up = present[0][1]
        else:  # fused layer: A's stacked, B's on the block diagonal, zeros for parts not trained
            a0 = present[0][1][0]
            down = a0.new_zeros(rank * count, *a0.shape[1:])
            up = a0.new_zeros(sum(width for _, width in parts), rank * count)
            offsets = [sum(width for _, width in parts[:i]) for i in range(count)]
            for i, (a, b) in present:
                down[i * rank : (i + 1) * rank] = a
                up[offsets[i] : offsets[i] + b.shape[0], i * rank : (i + 1) * rank] = b.reshape(b.shape[0], rank)
        out[layer + DOWN] = down.contiguous()
        out[layer + UP] = up.contiguous()
        out[layer + ALPHA] = torch.tensor(float(alpha) * count)
    return out


def from_kohya(state: dict[str, Tensor], layout: Layout, source: str = "file") -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{module: (A, B, scale)}`` from kohya tensors; the update of each module is ``B @ A * scale``.

    A fused layer is split into its parts: stacked ``A``s with a block-diagonal ``up`` (what
    :func:`to_kohya` writes) give each part its own block; any other ``up`` gives each part the
    whole ``down`` and its rows of ``up``. Parts whose update is all zero are left out. A layer
    this model does not have is a UserError naming it.
    """
    layers = sorted(key[: -len(DOWN)] for key in state if key.endswith(DOWN))
    unknown = [layer for layer in layers if layer not in layout]
    if unknown:
        raise UserError(
            f"{source}: kohya layer {unknown[0]!r} (and {len(unknown) - 1} more) is not a layer of this model; "
            "was the LoRA trained for another model family?"
        )
    adapters: dict[str, tuple[Tensor, Tensor, float]] = {}
    for layer in layers:
        down, up = state[layer + DOWN].float(), state[layer + UP].float()
        rank = down.shape[0]
        scale = float(state[layer + ALPHA]) / rank if layer + ALPHA in state else 1.0
        parts = layout[layer]
        if len(parts) == 1:
            adapters[parts[0][0]] = (down, up, scale)
            continue
        widths = [width for _, width in parts]
        if up.shape[0] != sum(widths):
            raise UserError(f"{source}: {layer}.lora_up has {up.shape[0]} rows; this model's layer has {sum(widths)}")
        offsets = [sum(widths[:i]) for i in range(len(parts))]
        block = rank // len(parts) if rank % len(parts) == 0 else 0
        diagonal = block > 0 and all(
            not up[offsets[i] : offsets[i] + widths[i], j * block : (j + 1) * block].any()
            for i in range(len(parts)) for j in range(len(parts)) if i != j
        )  # fmt: skip
        for i, (name, width) in enumerate(parts):
            rows = up[offsets[i] : offsets[i] + width]
            a, b = (down[i * block : (i + 1) * block], rows[:, i * block : (i + 1) * block]) if diagonal else (down, rows)
            if b.any():
                adapters[name] = (a.contiguous(), b.contiguous(), scale)
    return adapters


def is_kohya_state(keys) -> bool:
    """True for kohya-format tensor names (``*.lora_down.weight``)."""
    return any(key.endswith(DOWN) for key in keys)


def kohya_metadata(family: str, rank: int, alpha: float, model: str | None, name: str, ours: dict[str, str]) -> dict[str, str]:
    """The safetensors header: kohya's ``ss_*`` keys plus diffalign's own JSON."""
    from diffalign.lora import DIFFALIGN_METADATA_KEY

    return {
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_module": NETWORK_MODULE[family],
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_sd_model_name": model or "",
        "ss_output_name": name,
        "ss_training_comment": f"trained with diffalign ({ours.get('method') or 'unknown method'})",
        "ss_v2": "False",
        DIFFALIGN_METADATA_KEY: json.dumps({**ours, "format": "kohya"}, sort_keys=True),
    }


def write_new_file(tensors: dict[str, Tensor], out: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temporary file, then rename); an existing ``out`` is a UserError."""
    from diffalign.files import tensors_bytes, write_file

    if out.exists():
        raise UserError(f"--out {out} exists; give a new path (export never overwrites a file)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    try:
        write_file(tmp, tensors_bytes(tensors, metadata=metadata))  # fsync'd; the user's umask, not 0600
        os.rename(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
