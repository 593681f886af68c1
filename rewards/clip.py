"""``clip``: CLIP score with open_clip, and the open_clip machinery ``hpsv2`` and ``aesthetic`` share.

    clip(image, prompt) = scale * cos(E_img(image), E_txt(prompt))     (scale 100 by default)

``model`` is an open_clip architecture name (``"ViT-L-14"``, weights from the ``pretrained`` tag or a
checkpoint file), ``"hf-hub:org/repo"``, or a local directory in open_clip's hub layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``; ``pretrained`` is then ignored).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from diffalign.errors import UserError

from .base import Reward, to_device_async
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from .registry import register_reward
from .weights import freeze, is_local_dir, missing_weights_error, resolve_device, resolve_dtype


def open_clip_name(model: str) -> str:
    """open_clip's identifier for ``model``: a local directory becomes ``"local-dir:<path>"``."""
    if model.startswith(("hf-hub:", "local-dir:")):
        return model
    return f"local-dir:{model}" if is_local_dir(model) else model


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict,
                          directory: str | os.PathLike) -> None:
    """Write ``model`` as a local folder in open_clip's hub layout (``open_clip_config.json`` with
    ``model_cfg`` and ``preprocess_cfg``, + ``open_clip_model.safetensors``): what ``clip:model=DIR``
    (and :func:`load_open_clip`) reads."""
    from safetensors.torch import save_file

    write_open_clip_config(directory, model_cfg, preprocess_cfg)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "open_clip_model.safetensors"))


def write_open_clip_config(directory: str | os.PathLike, model_cfg: dict, preprocess_cfg: dict) -> None:
    """``open_clip_config.json`` (open_clip's hub layout) in ``directory``, which it creates."""
    import json

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as handle:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, handle, indent=2)


def load_open_clip(
    reward: str, model: str, pretrained: str | None, *, load_weights: bool = True, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Build an open_clip model on ``device``, its tokenizer and its preprocessing config, frozen in eval mode.

    The modules are created on ``device`` (``with torch.device(device)``), so the model is never whole
    in CPU memory; open_clip reads the checkpoint itself onto the CPU and copies it in.

    Args:
        reward: the reward name, for error messages.
        model: architecture name, ``hf-hub:`` id or local directory (see module docstring).
        pretrained: tag (``"openai"``) or checkpoint path for an architecture name; ignored otherwise.
        load_weights: False builds the architecture only (HPS loads its own checkpoint afterwards).
        device: where the parameters are created (float32; callers cast).

    Raises:
        UserError: unknown architecture or tag, or weights that cannot be fetched (names the hub id).
    """
    import open_clip

    name = open_clip_name(model)
    is_arch = not name.startswith(("hf-hub:", "local-dir:"))
    if is_arch and name not in open_clip.list_models():
        raise UserError(f"reward '{reward}': model='{model}' is neither a local directory nor an open_clip "
                        f"architecture (e.g. ViT-B-32, ViT-L-14, ViT-H-14)")
    if name.startswith("local-dir:") and load_weights and not _has_weights(name.removeprefix("local-dir:")):
        raise UserError(f"reward '{reward}': model='{model}' holds no weights file "
                        f"(expected open_clip_model.safetensors next to open_clip_config.json)")
    if is_arch and not pretrained and load_weights:
        warnings.warn(f"reward '{reward}': model='{model}' with pretrained=None has random weights", stacklevel=3)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if is_arch and pretrained else {}
    if is_arch and pretrained and load_weights and not tag_cfg and not _is_file(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise UserError(f"reward '{reward}': pretrained='{pretrained}' is neither a file nor a tag of {name} (tags: {tags})")
    try:
        # open_clip logs its failures on the root logger before raising; the UserError below says it in one line.
        with _quiet_root_logger(), torch.device(device):
            clip_model = open_clip.create_model(name, pretrained=pretrained if is_arch else None,
                                                load_weights=load_weights, weights_only=True, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as error:
        source = tag_cfg.get("hf_hub", "").rstrip("/") or tag_cfg.get("url") or name.removeprefix("hf-hub:")
        if is_arch and tag_cfg:
            hint_option, hint = "model", "/path/to/open_clip_dir (or pretrained=/path/to/checkpoint)"
        else:
            hint_option, hint = "model", "/path/to/open_clip_dir"
        raise missing_weights_error(reward, source, hint_option, hint, error) from error
    preprocess = dict(open_clip.get_model_preprocess_cfg(clip_model))
    if tag_cfg:  # a tag's own mean/std (e.g. SigLIP) win over the defaults
        preprocess.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    return freeze(clip_model), tokenizer, preprocess


class OpenClipScore(Reward):
    """``scale * cos(image, text)`` on an open_clip model; ``clip`` and ``hpsv2`` are instances.

    Args:
        name: registry name.
        clip_model, tokenizer: from :func:`load_open_clip`.
        preprocess: dict with size, mean, std, interpolation, resize_mode (open_clip's PreprocessCfg).
        scale: multiplies the cosine similarity.
    """

    def __init__(self, name: str, clip_model: torch.nn.Module, tokenizer: Any, preprocess: dict[str, Any], *,
                 scale: float, batch_size: int, bt_scale: float, dtype: torch.dtype) -> None:
        super().__init__(name, differentiable=True, batch_size=batch_size, bt_scale=bt_scale)
        self.model = clip_model.to(dtype)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.scale = scale
        self.dtype = dtype
        self._token_cache: dict[str, torch.Tensor] = {}  # prompt -> token ids [context]; prompt sets repeat

    def tokens(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Token ids [b, context] on ``device``; each distinct prompt is tokenised once (up to 8192 cached)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            if len(self._token_cache) + len(missing) > 8192:
                self._token_cache.clear()
            self._token_cache.update(zip(missing, self.tokenizer(missing)))
        return to_device_async(torch.stack([self._token_cache[p] for p in prompts]), device)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] -> normalised [b, 3, S, S] in the model's dtype."""
        cfg = self.preprocess
        pixels = clip_preprocess(images.float(), cfg.get("size", 224), cfg.get("mean", OPENAI_CLIP_MEAN),
                                 cfg.get("std", OPENAI_CLIP_STD), cfg.get("interpolation", "bicubic"),
                                 cfg.get("resize_mode", "shortest"), cfg.get("fill_color", 0) / 255.0)
        return pixels.to(self.dtype)

    def embed(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw model forward: unit-norm image and text embeddings, each [b, D] float32."""
        tokens = self.tokens(prompts, pixels.device)
        image_features = self.model.encode_image(pixels)
        text_features = self.model.encode_text(tokens)
        return F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_features, text_features = self.embed(self.pixel_values(images), prompts)
        return self.scale * (image_features * text_features).sum(dim=-1)


@register_reward("clip", differentiable=True, weights="download: openai ViT-L-14 (open_clip)")
def build_clip(model: str = "ViT-L-14", pretrained: str | None = "openai", scale: float = 100.0,
               batch_size: int = 16, device: str = "cpu", dtype: str = "float32", bt_scale: float = 1.0) -> Reward:
    """CLIP score ``scale * cos`` (open_clip). ``model``: architecture, ``hf-hub:`` id or local open_clip dir."""
    device = resolve_device(device, "clip")
    clip_model, tokenizer, preprocess = load_open_clip("clip", model, pretrained, device=device)
    reward = OpenClipScore("clip", clip_model, tokenizer, preprocess, scale=scale, batch_size=batch_size,
                           bt_scale=bt_scale, dtype=resolve_dtype(dtype, device, "clip"))
    return reward.to(device)  # the model is already there; this moves the reward's empty device anchor


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


def _has_weights(directory: str) -> bool:
    return any(glob.glob(os.path.join(directory, f"*{ext}")) for ext in (".safetensors", ".bin", ".pth", ".pt"))
