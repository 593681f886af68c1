"""Rule-based rewards: no weights, no downloads, usable anywhere (the quickstart and the tests).

brightness             mean pixel value, in [0, 1]                                   differentiable
saturation             mean HSV saturation (max - min) / max, in [0, 1]              differentiable
target_color           -mean squared RGB distance to ``color``, in [-3, 0]           differentiable
jpeg_compressibility   -(JPEG size in kB), DDPO (Black et al. 2023), quality 95      not differentiable
jpeg_incompressibility +(JPEG size in kB)                                            not differentiable
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import torch

from diffalign.errors import UserError

from .base import Reward
from .image_ops import to_uint8_hwc
from .registry import register_reward

ImageRule = Callable[[torch.Tensor], torch.Tensor]


class RuleReward(Reward):
    """A reward computed by a plain function of the images: [b, 3, H, W] in [0, 1] -> [b]."""

    def __init__(self, name: str, rule: ImageRule, *, differentiable: bool, batch_size: int | None,
                 bt_scale: float, device: str | None = None) -> None:
        super().__init__(name, differentiable=differentiable, batch_size=batch_size, bt_scale=bt_scale,
                         weightless=device is None)
        self.rule = rule
        if device is not None:
            self.to(device)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.rule(images)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value. images: [B, 3, H, W] in [0, 1] -> [B] in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


def saturation(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean HSV saturation, (max - min) / max per pixel (0 where max = 0). -> [B] in [0, 1]."""
    high = images.amax(dim=1)
    low = images.amin(dim=1)
    sat = (high - low) / high.clamp_min(eps)
    return torch.where(high > eps, sat, torch.zeros_like(sat)).mean(dim=(1, 2))


def target_color_distance(images: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """-mean over pixels of the squared RGB distance to ``color`` [3]. -> [B] in [-3, 0]."""
    diff = images - color.to(images).view(1, 3, 1, 1)
    return -(diff**2).sum(dim=1).mean(dim=(1, 2))


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kilobytes (1 kB = 1000 bytes) of each image at ``quality``. -> [B] on images' device."""
    from PIL import Image

    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("brightness", differentiable=True, uses_prompts=False, weights="none")
def build_brightness(batch_size: int | None = None, bt_scale: float = 10.0, device: str | None = None) -> Reward:
    """Mean pixel value in [0, 1]."""
    return RuleReward("brightness", brightness, differentiable=True, batch_size=batch_size, bt_scale=bt_scale, device=device)


@register_reward("saturation", differentiable=True, uses_prompts=False, weights="none")
def build_saturation(batch_size: int | None = None, bt_scale: float = 10.0, device: str | None = None) -> Reward:
    """Mean HSV saturation in [0, 1]."""
    return RuleReward("saturation", saturation, differentiable=True, batch_size=batch_size, bt_scale=bt_scale, device=device)


@register_reward("target_color", differentiable=True, uses_prompts=False, weights="none")
def build_target_color(color: Sequence[float] | str = (1.0, 0.0, 0.0), batch_size: int | None = None,
                       bt_scale: float = 10.0, device: str | None = None) -> Reward:
    """Negative mean squared distance to ``color``: an RGB triple in [0, 1] or a hex string '#ff8800'."""
    rgb = _parse_color(color)
    return RuleReward("target_color", lambda images: target_color_distance(images, rgb), differentiable=True,
                      batch_size=batch_size, bt_scale=bt_scale, device=device)


@register_reward("jpeg_compressibility", differentiable=False, uses_prompts=False, weights="none")
def build_jpeg_compressibility(quality: int = 95, batch_size: int | None = None, bt_scale: float = 0.1,
                               device: str | None = None) -> Reward:
    """-(JPEG size in kB): higher for images that compress well (DDPO's compressibility task)."""
    _check_quality(quality)
    return RuleReward("jpeg_compressibility", lambda images: -jpeg_size_kb(images, quality), differentiable=False,
                      batch_size=batch_size, bt_scale=bt_scale, device=device)


@register_reward("jpeg_incompressibility", differentiable=False, uses_prompts=False, weights="none")
def build_jpeg_incompressibility(quality: int = 95, batch_size: int | None = None, bt_scale: float = 0.1,
                                 device: str | None = None) -> Reward:
    """+(JPEG size in kB): higher for detailed, hard-to-compress images (DDPO's incompressibility task)."""
    _check_quality(quality)
    return RuleReward("jpeg_incompressibility", lambda images: jpeg_size_kb(images, quality), differentiable=False,
                      batch_size=batch_size, bt_scale=bt_scale, device=device)


def _parse_color(color: Sequence[float] | str) -> torch.Tensor:
    if isinstance(color, str):
        text = color.lstrip("#")
        if len(text) != 6 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise UserError(f"reward 'target_color': color='{color}' is not a hex colour like '#ff8800' or [1.0, 0.5, 0.0]")
        return torch.tensor([int(text[i : i + 2], 16) / 255.0 for i in (0, 2, 4)])
    values = list(color) if isinstance(color, (list, tuple)) else None
    if values is None or len(values) != 3 or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values):
        raise UserError(f"reward 'target_color': color={color!r} must be three numbers in [0, 1], e.g. [1.0, 0.5, 0.0]")
    return torch.tensor([float(v) for v in values])


def _check_quality(quality: int) -> None:
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"reward 'jpeg_compressibility': quality={quality!r} must be an integer in [1, 100]")
