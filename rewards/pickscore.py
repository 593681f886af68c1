"""``pickscore``: PickScore v1 (Kirstain et al. 2023, arXiv 2305.01569).

    pickscore(image, prompt) = exp(logit_scale) * cos(E_img(image), E_txt(prompt))    about 18 .. 24

A transformers ``CLIPModel`` (ViT-H-14) fine-tuned on Pick-a-Pic; its image processor and tokenizer
are those of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model repo ships none). The processor's
settings (shortest-edge resize, bicubic, centre crop, mean/std) are re-done in torch so gradients
reach the images. PickScore's preference probability is the softmax of these scores over the
candidates, i.e. the Bradley-Terry comparison with scale 1.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from .base import Reward, to_device_async
from .image_ops import center_crop, interpolation_mode, normalize, resize_shortest_side
from .registry import register_reward
from .weights import freeze, is_local_dir, load_onto, missing_weights_error, resolve_device, resolve_dtype

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class PickScore(Reward):
    """logit_scale * cosine similarity of a transformers CLIPModel."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, batch_size: int, bt_scale: float,
                 dtype: torch.dtype) -> None:
        super().__init__("pickscore", differentiable=True, batch_size=batch_size, bt_scale=bt_scale)
        self.model = model.to(dtype)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        size = image_processor.size
        crop = image_processor.crop_size
        self.resize_to = int(size["shortest_edge"])
        self.crop_to = (int(crop["height"]), int(crop["width"]))
        self.mean = tuple(image_processor.image_mean)
        self.std = tuple(image_processor.image_std)
        self.resample = image_processor.resample
        self.dtype = dtype

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] -> [b, 3, crop, crop], as CLIPImageProcessor would make them."""
        mode = interpolation_mode(self.resample if self.resample is not None else "bicubic")
        resized = resize_shortest_side(images.float(), self.resize_to, mode)
        cropped = center_crop(resized, self.crop_to, offset_rounding="floor")  # as CLIPImageProcessor
        return normalize(cropped, self.mean, self.std).to(self.dtype)

    def text_inputs(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return {key: to_device_async(value, device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}

    def embed(self, pixels: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The raw model forward: logit_scale * cos, [b] float32."""
        vision = self.model.vision_model(pixel_values=pixels)
        image_embeds = self.model.visual_projection(vision.pooler_output)
        language = self.model.text_model(**text)
        text_embeds = self.model.text_projection(language.pooler_output)
        cosine = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
        return self.model.logit_scale.float().exp() * cosine

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.embed(self.pixel_values(images), self.text_inputs(prompts, images.device))


@register_reward("pickscore", differentiable=True,
                 weights="download: yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K (processor)")
def build_pickscore(model: str = DEFAULT_MODEL, processor: str | None = None, batch_size: int = 16,
                    device: str = "cpu", dtype: str = "float32", bt_scale: float = 1.0) -> Reward:
    """PickScore. ``model``: hub id or local HF directory; ``processor``: where the CLIP processor comes
    from (default: ``model`` if it holds one, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    from transformers import AutoProcessor, CLIPModel

    device = resolve_device(device, "pickscore")
    torch_dtype = resolve_dtype(dtype, device, "pickscore")
    if processor is None:
        has_own = is_local_dir(model) and any(os.path.isfile(os.path.join(model, f)) for f in _PROCESSOR_FILES)
        processor = model if has_own else DEFAULT_PROCESSOR
    try:
        clip_model = CLIPModel.from_pretrained(model, **load_onto(device, torch_dtype))
    except (OSError, ValueError) as error:
        raise missing_weights_error("pickscore", model, "model", "/path/to/PickScore_v1", error) from error
    try:
        clip_processor = AutoProcessor.from_pretrained(processor)
    except (OSError, ValueError) as error:
        raise missing_weights_error("pickscore", processor, "processor", "/path/to/CLIP-ViT-H-14-processor", error) from error
    reward = PickScore(freeze(clip_model), clip_processor, batch_size=batch_size, bt_scale=bt_scale,
                       dtype=torch_dtype)
    return reward.to(device)  # the model is already there; this moves the reward's empty device anchor
