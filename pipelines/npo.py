"""Negative-model guidance (Diffusion-NPO, Self-NPO) in a stock diffusers pipeline.

A *negative LoRA* (trained with ``negative: true`` on Diffusion-DPO / D3PO / GRPO, or with
Self-NPO) replaces the unconditional branch of classifier-free guidance:

    eps = eps_neg(x, t, c_uncond) + w * (eps_pos(x, t, c) - eps_neg(x, t, c_uncond))

``eps_pos`` is the model the pipeline already runs (the base, or the base plus whatever positive
LoRAs are active); ``eps_neg`` is that model plus the negative LoRA (Diffusion-NPO trains the
negative offset on the base and adds it to whatever weights guide the sample). Both branches run
on the one denoiser by switching peft adapters per branch; nothing is copied::

    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    enable_npo(pipe, "runs/self_npo/final", scale=1.0)
    image = pipe("a cat", guidance_scale=5.0).images[0]
    disable_npo(pipe)                       # back to the untouched pipeline, bit for bit

How each family's pipeline is split into branches:

* **SD / SDXL / SD3** batch ``[uncond, cond]`` into one denoiser call under CFG. While NPO is enabled the
  denoiser's ``forward`` is wrapped: inside the pipeline's denoising loop (the ``progress_bar``
  context every SD/SDXL/SD3 ``__call__`` opens around it, which is tracked) and with the pipeline's
  ``do_classifier_free_guidance`` on, the batch is split in halves, the first (unconditional /
  negative-prompt) half runs with the negative adapter active and the second with the positive
  adapters, and the outputs are concatenated. Every other call of the UNet passes through as is.
  Cost: two half-batch UNet calls per step instead of one full-batch call (same FLOPs, a little
  less parallelism; results equal the one-call ones up to float summation order).
* **FLUX** with true CFG (``true_cfg_scale > 1`` and a negative prompt, ``""`` included) already
  makes a separate negative pass inside ``transformer.cache_context("uncond")``; the transformer's
  ``cache_context`` is wrapped so that the negative adapter is active exactly inside that context.
  No extra cost.

Without CFG (``guidance_scale <= 1``; FLUX without true CFG) the pipeline runs no unconditional
branch, so NPO cannot act: the first such call warns (once). :func:`disable_npo` removes the
adapter and the wrappers and restores every adapter state it touched.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

NPO_ADAPTER_NAME = "npo_negative"
# Attribute on the denoiser that holds the NPO state while it is enabled.
_STATE_ATTR = "_diffalign_npo"
_MISSING = object()


@dataclass
class _NPOState:
    """What enable_npo changed on the denoiser, so disable_npo can put it back."""

    adapter_name: str
    family: str
    pipe_ref: "weakref.ReferenceType"
    layers: list  # peft tuner layers that hold the negative adapter
    adapter_params: list[torch.nn.Parameter]  # every LoRA parameter of those layers
    created_peft: bool  # the denoiser had no peft adapters before enable_npo
    peft_flag: Any  # the denoiser's ``_hf_peft_config_loaded`` before (or _MISSING)
    merge_weight: float = 0.0  # beta: the negative branch runs base + delta + (1 - beta)(positive - base)
    all_layers: list = field(default_factory=list)  # every tuner layer (the positive adapters scaled by 1 - beta)
    wrapped: dict[str, Any] = field(default_factory=dict)  # denoiser attribute -> previous instance value
    pipe_wrapped: dict[str, Any] = field(default_factory=dict)  # pipeline attribute -> previous instance value
    loop_depth: int = 0  # > 0 while the pipeline's denoising loop runs
    cond_seen: bool = False  # FLUX: a conditional pass has run
    uncond_passes: int = 0  # FLUX: negative passes since the last conditional one
    warned: bool = False


_INERT = (
    "NPO is enabled but this pipeline call has no unconditional branch, so the negative LoRA is "
    "unused; {how}"
)


def _warn_inert(state: _NPOState, how: str) -> None:
    if not state.warned:
        state.warned = True
        warnings.warn(_INERT.format(how=how), UserWarning, stacklevel=4)


def _family(pipe) -> str:
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion3"):
        return "sd3"  # batches [uncond, cond] like SD/SDXL, through its transformer
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd"
    raise ValueError(
        f"NPO guidance supports Stable Diffusion, SDXL, FLUX and SD3 pipelines, got {name}"
    )


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if _family(pipe) in ("flux", "sd3") else pipe.unet


def _tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _lora_params(layers: list) -> list[torch.nn.Parameter]:
    params = []
    for layer in layers:
        for layer_name in layer.adapter_layer_names:
            container = getattr(layer, layer_name)
            for sub in container.values():
                params.extend(sub.parameters() if isinstance(sub, torch.nn.Module) else [sub])
    return params


def is_npo_enabled(pipe) -> bool:
    """Whether :func:`enable_npo` is active on ``pipe``."""
    return getattr(_denoiser(pipe), _STATE_ATTR, None) is not None


# --- per-branch adapter switching --------------------------------------------------------------


@contextlib.contextmanager
def _negative_branch(state: _NPOState, fast_path: bool = True) -> Iterator[None]:
    """Inside the block every layer holding the negative adapter runs positives + negative.

    "Positives" are the adapters active on that layer at this moment (none if adapters are
    disabled); afterwards each layer gets back exactly its active list and enabled flag.

    The switch writes peft's plain attributes ``_active_adapter`` / ``_disable_adapters`` (what
    the public ``active_adapters`` / ``disable_adapters`` read) straight into each layer's
    ``__dict__``: ``set_adapter`` / ``enable_adapters`` also rewrite every adapter weight's
    ``requires_grad`` (about 60 us per layer, 35 ms per step on SDXL's 560 LoRA layers, and
    nothing inference needs), and even ``nn.Module.__setattr__`` costs ~4 us per layer. Layers
    without those attributes (another peft) go through the public calls, and their
    ``requires_grad`` flags are put back afterwards.
    """
    name = state.adapter_name
    scaled = []  # (scaling dict, adapter, value) of positive adapters scaled by 1 - merge_weight
    if state.merge_weight:
        for layer in state.all_layers:
            scaling = getattr(layer, "scaling", None)
            if isinstance(scaling, dict) and not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter != name and adapter in scaling:
                        scaled.append((scaling, adapter, scaling[adapter]))
                        scaling[adapter] = scaling[adapter] * (1.0 - state.merge_weight)
    saved = [(list(layer.active_adapters), layer.disable_adapters) for layer in state.layers]
    fast = fast_path and all("_active_adapter" in vars(layer) and "_disable_adapters" in vars(layer) for layer in state.layers)
    flags = None if fast else [p.requires_grad for p in state.adapter_params]
    try:
        for layer, (active, disabled) in zip(state.layers, saved):
            names = ([] if disabled else [a for a in active if a != name]) + [name]
            if fast:
                vars(layer).update(_active_adapter=names, _disable_adapters=False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(names)
        yield
    finally:
        for layer, (active, disabled) in zip(state.layers, saved):
            if fast:
                vars(layer).update(_active_adapter=active, _disable_adapters=disabled)
            else:
                layer.set_adapter(active)
                layer.enable_adapters(not disabled)
        if flags is not None:
            for param, flag in zip(state.adapter_params, flags):
                param.requires_grad_(flag)
        for scaling, adapter, value in scaled:
            scaling[adapter] = value


def _half(obj: Any, batch: int, index: int) -> Any:
    """Half ``index`` (0 = unconditional, 1 = conditional) of every batched tensor in ``obj``."""
    if isinstance(obj, Tensor):
        return obj.chunk(2)[index] if obj.ndim > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return type(obj)({k: _half(v, batch, index) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_half(v, batch, index) for v in obj)
    return obj


def _cat(uncond: Any, cond: Any) -> Any:
    """Concatenate the two branches' outputs back into the pipeline's [uncond, cond] batch."""
    if isinstance(uncond, Tensor):
        return torch.cat([uncond, cond])
    if isinstance(uncond, dict):  # diffusers BaseOutput is an OrderedDict
        return type(uncond)(**{k: _cat(v, cond[k]) for k, v in uncond.items()})
    if isinstance(uncond, (list, tuple)):
        return type(uncond)(_cat(a, b) for a, b in zip(uncond, cond))
    raise TypeError(f"cannot concatenate denoiser outputs of type {type(uncond).__name__}")


def _doing_cfg(pipe) -> bool:
    """The pipeline's own ``do_classifier_free_guidance`` (False before its first call)."""
    try:
        return bool(pipe.do_classifier_free_guidance)
    except AttributeError:
        return False


class _DenoisingLoop:
    """The pipeline's progress bar, counting while its ``with`` block (the denoising loop) runs."""

    def __init__(self, bar, state: _NPOState) -> None:
        self.bar, self.state = bar, state

    def __enter__(self):
        self.state.loop_depth += 1
        return self.bar.__enter__()

    def __exit__(self, *exc):
        self.state.loop_depth -= 1
        return self.bar.__exit__(*exc)


def _track_denoising_loop(pipe, state: _NPOState) -> None:
    progress_bar = pipe.progress_bar

    def npo_progress_bar(iterable=None, total=None):
        bar = progress_bar(iterable=iterable, total=total)
        return bar if iterable is not None else _DenoisingLoop(bar, state)

    state.pipe_wrapped["progress_bar"] = pipe.__dict__.get("progress_bar", _MISSING)
    pipe.progress_bar = npo_progress_bar


def _wrap_batched_forward(denoiser: torch.nn.Module, state: _NPOState) -> None:
    forward = denoiser.forward  # the bound method, or an earlier wrapper (e.g. offload hooks)

    def npo_forward(*args, **kwargs):
        pipe = state.pipe_ref()
        if pipe is None or state.loop_depth == 0 or not _doing_cfg(pipe):
            if pipe is not None and state.loop_depth > 0:
                _warn_inert(state, "use guidance_scale > 1")
            return forward(*args, **kwargs)
        sample = args[0] if args else kwargs["sample" if "sample" in kwargs else "hidden_states"]  # UNet / SD3 transformer
        batch = sample.shape[0]
        if batch % 2:
            raise RuntimeError(f"NPO guidance expects an [uncond, cond] batch of even size, got {batch}")
        with _negative_branch(state):
            uncond = forward(*_half(args, batch, 0), **_half(kwargs, batch, 0))
        cond = forward(*_half(args, batch, 1), **_half(kwargs, batch, 1))
        return _cat(uncond, cond)

    state.wrapped["forward"] = denoiser.__dict__.get("forward", _MISSING)
    denoiser.forward = npo_forward


def _wrap_cache_context(denoiser: torch.nn.Module, state: _NPOState) -> None:
    cache_context = denoiser.cache_context

    @contextlib.contextmanager
    def npo_cache_context(name: str, **kwargs):
        if name == "cond":
            # Each step makes its "cond" pass, then (true CFG only) its "uncond" pass: a second
            # "cond" with no "uncond" in between means the call runs without true CFG.
            if state.cond_seen and state.uncond_passes == 0:
                _warn_inert(state, "FLUX needs true_cfg_scale > 1 and a negative_prompt ('' is fine)")
            state.cond_seen, state.uncond_passes = True, 0
        with cache_context(name, **kwargs):
            if name == "uncond":
                state.uncond_passes += 1
                with _negative_branch(state):
                    yield
            else:
                yield

    state.wrapped["cache_context"] = denoiser.__dict__.get("cache_context", _MISSING)
    denoiser.cache_context = npo_cache_context


# --- public API ---------------------------------------------------------------------------------


def enable_npo(
    pipe,
    negative_lora: str | os.PathLike,
    scale: float = 1.0,
    adapter_name: str = NPO_ADAPTER_NAME,
    weight_name: str | None = None,
    merge_weight: float = 0.0,
):
    """Guide ``pipe`` with a negative LoRA in place of its unconditional branch (see module doc).

    negative_lora: a folder (or ``.safetensors`` file) in diffusers LoRA format, e.g. the
        ``final/`` of a diffalign run with ``negative: true`` or of Self-NPO; only the denoiser's
        weights are used. Alpha is read from the file's adapter metadata, as a stock
        ``load_lora_weights`` does.
    scale: strength of the negative LoRA (multiplies its alpha / rank).
    merge_weight: beta of the Diffusion-NPO authors' code (G-U-N/Diffusion-NPO): the negative
        branch is ``base + delta + (1 - beta) (positive - base)``, i.e. the positive LoRAs run at
        ``1 - beta`` of their strength there. 0 (default) = positive + delta; 1 = base + delta.
    Returns ``pipe`` (changed in place). Raises ValueError if NPO is already enabled, the pipeline
    family is not SD/SDXL/FLUX, or ``adapter_name`` is taken.
    """
    family = _family(pipe)
    denoiser = _denoiser(pipe)
    if not 0.0 <= merge_weight <= 1.0:
        raise ValueError(f"merge_weight must be in [0, 1], got {merge_weight}")
    if getattr(denoiser, _STATE_ATTR, None) is not None:
        raise ValueError("NPO is already enabled on this pipeline; call disable_npo(pipe) first")
    if adapter_name in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"the denoiser already has an adapter named {adapter_name!r}; pass another adapter_name")

    # 1. remember the adapter state the pipeline has now (the positive model)
    before = _tuner_layers(denoiser)
    before_state = {id(layer): (list(layer.active_adapters), layer.disable_adapters) for layer in before}
    before_flags = [(p, p.requires_grad) for p in _lora_params(before)]
    created_peft = not getattr(denoiser, "_hf_peft_config_loaded", False)
    peft_flag = denoiser.__dict__.get("_hf_peft_config_loaded", _MISSING)

    # 2. load the negative LoRA as one more adapter of the same denoiser
    path = os.fspath(negative_lora)
    if os.path.isfile(path):
        path, weight_name = os.path.dirname(path) or ".", os.path.basename(path)
    prefix = "transformer" if family in ("flux", "sd3") else "unet"
    denoiser.load_lora_adapter(
        path, prefix=prefix, adapter_name=adapter_name, weight_name=weight_name, use_safetensors=True,
        _pipeline=pipe,
    )
    if adapter_name not in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"{negative_lora} holds no {prefix} LoRA weights for the {family} denoiser")

    # 3. loading made the new adapter active: put the positive state back, negative inactive
    layers = _tuner_layers(denoiser)
    for layer in layers:
        active, disabled = before_state.get(id(layer), ([], False))
        layer.set_adapter(active)
        if disabled:
            layer.enable_adapters(False)
        if hasattr(layer, "set_scale"):
            layer.set_scale(adapter_name, scale)
    negative_layers = [
        layer for layer in layers if any(adapter_name in getattr(layer, n) for n in layer.adapter_layer_names)
    ]
    params = _lora_params(negative_layers)
    for param in params:
        param.requires_grad_(False)
    for param, flag in before_flags:
        param.requires_grad_(flag)

    # 4. route the unconditional branch through the negative adapter
    state = _NPOState(
        adapter_name=adapter_name,
        family=family,
        pipe_ref=weakref.ref(pipe),
        layers=negative_layers,
        adapter_params=params,
        created_peft=created_peft,
        peft_flag=peft_flag,
        merge_weight=float(merge_weight),
        all_layers=layers,
    )
    if family == "flux":
        _wrap_cache_context(denoiser, state)
    else:
        _track_denoising_loop(pipe, state)
        _wrap_batched_forward(denoiser, state)
    setattr(denoiser, _STATE_ATTR, state)
    return pipe


def disable_npo(pipe):
    """Undo :func:`enable_npo`: the pipeline computes exactly what it did before. Returns ``pipe``.

    The wrappers are removed (the denoiser's ``forward`` / ``cache_context`` and the pipeline's
    ``progress_bar`` are their own again),
    the negative adapter is deleted, and if the denoiser had no adapters before, the peft layers
    are unloaded so that its modules and state dict are the original ones.
    """
    denoiser = _denoiser(pipe)
    state: _NPOState | None = getattr(denoiser, _STATE_ATTR, None)
    if state is None:
        raise ValueError("NPO is not enabled on this pipeline")
    for owner, wrapped in ((denoiser, state.wrapped), (pipe, state.pipe_wrapped)):
        for attr, previous in wrapped.items():
            if previous is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, previous)
    delattr(denoiser, _STATE_ATTR)

    if state.created_peft:
        denoiser.unload_lora()
        if state.peft_flag is _MISSING:
            denoiser.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            denoiser._hf_peft_config_loaded = state.peft_flag
        return pipe
    layers = _tuner_layers(denoiser)
    saved = {id(layer): (list(layer.active_adapters), layer.disable_adapters) for layer in layers}
    flags = [(p, p.requires_grad) for p in _lora_params(layers)]
    denoiser.delete_adapters(state.adapter_name)
    for layer in layers:
        active, disabled = saved[id(layer)]
        layer.set_adapter([a for a in active if a != state.adapter_name])
        if disabled:
            layer.enable_adapters(False)
    for param, flag in flags:
        param.requires_grad_(flag)
    return pipe


def apply_npo_to_pipeline(pipe, npo_path: str | os.PathLike, scale: float = 1.0, merge_weight: float = 0.0):
    """``diffalign generate --npo PATH``: check the LoRA, then :func:`enable_npo`.

    A LoRA written by diffalign must be marked negative (``"negative": "true"`` in its metadata,
    set by ``negative: true`` runs and Self-NPO) and be for the pipeline's family; a LoRA without
    diffalign metadata (e.g. published Diffusion-NPO weights) is used as given. Mistakes are
    one-line UserErrors.
    """
    from diffalign.errors import UserError
    from diffalign.lora import read_lora_metadata

    path = os.fspath(npo_path)
    if not os.path.exists(path):
        raise UserError(f"--npo {path}: no such file or folder; point it at the final/ folder of a negative run")
    metadata = read_lora_metadata(path)
    family = _family(pipe)
    if metadata:
        if metadata.get("negative", "false").lower() != "true":
            method = metadata.get("method") or "unknown method"
            raise UserError(
                f"--npo {path}: this LoRA ({method}) is not a negative model; train one with "
                "method: self_npo or with negative: true (dpo.negative, d3po.negative, grpo.negative)"
            )
        if metadata.get("family") and metadata["family"] != family:
            raise UserError(
                f"--npo {path}: the LoRA was trained on a {metadata['family']} model but the pipeline is {family}; "
                "use a negative LoRA trained on the same base model"
            )
    if scale < 0:
        raise UserError(f"--npo-scale {scale}: must be >= 0 (it scales the negative LoRA)")
    if not 0.0 <= merge_weight <= 1.0:
        raise UserError(f"--npo-merge-weight {merge_weight}: must be in [0, 1] (0 = positive + negative LoRA, 1 = base + negative LoRA)")
    return enable_npo(pipe, path, scale=scale, merge_weight=merge_weight)
