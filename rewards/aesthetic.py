"""``aesthetic``: the LAION improved aesthetic predictor (C. Schuhmann, 2022), as used by DDPO.

    aesthetic(image) = MLP(E_img(image) / ||E_img(image)||)        roughly 1 (ugly) .. 10 (beautiful)

E_img is OpenAI CLIP ViT-L/14 (open_clip ``ViT-L-14`` / ``openai``, the same weights) and the MLP is
the published head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear layers with dropout 0.2, 0.2, 0.1 and no
activations, loaded as a state dict (``layers.{0,2,4,6,7}.{weight,bias}``) with ``weights_only=True``.
The prompt is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.errors import UserError

from .base import Reward
from .clip import load_open_clip
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from .registry import register_reward
from .weights import freeze, load_state_dict_file, resolve_device, resolve_dtype, resolve_hub_file

# The sac+logos+ava1-l14-linearMSE head, mirrored on the hub by TRL for its DDPO example.
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP. embedding [B, D] (unit norm) -> [B, 1]."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def load_aesthetic_head(path: str, device: torch.device | str = "cpu") -> AestheticHead:
    """Load the head onto ``device`` from a state-dict file; its input width is read from ``layers.0.weight``."""
    state = load_state_dict_file(path, "aesthetic", "head", device=device)
    if "layers.0.weight" not in state:
        raise UserError(f"reward 'aesthetic': head='{path}' is not an aesthetic-predictor state dict "
                        f"(no 'layers.0.weight'; found {sorted(state)[:4]})")
    with torch.device(device):
        head = AestheticHead(embed_dim=state["layers.0.weight"].shape[1])
    expected = set(head.state_dict())
    if set(state) != expected:
        raise UserError(f"reward 'aesthetic': head='{path}' has keys {sorted(set(state) ^ expected)[:4]} "
                        f"that do not match the 768-1024-128-64-16-1 MLP")
    head.load_state_dict(state)
    return freeze(head)


class AestheticScore(Reward):
    """CLIP image embedding -> L2 normalise -> MLP head."""

    def __init__(self, clip_model: torch.nn.Module, preprocess: dict, head: AestheticHead, *, batch_size: int,
                 bt_scale: float, dtype: torch.dtype) -> None:
        super().__init__("aesthetic", differentiable=True, batch_size=batch_size, bt_scale=bt_scale)
        self.model = clip_model.to(dtype)
        self.head = head  # kept in float32: it is small and its outputs are compared at 0.01 resolution
        self.preprocess = preprocess
        self.dtype = dtype

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] -> normalised [b, 3, 224, 224] (OpenAI CLIP preprocessing)."""
        cfg = self.preprocess
        pixels = clip_preprocess(images.float(), cfg.get("size", 224), cfg.get("mean", OPENAI_CLIP_MEAN),
                                 cfg.get("std", OPENAI_CLIP_STD), cfg.get("interpolation", "bicubic"),
                                 cfg.get("resize_mode", "shortest"))
        return pixels.to(self.dtype)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The raw model forward: pixels -> aesthetic score [b] float32."""
        embedding = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return self.head(embedding).squeeze(-1)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.embed(self.pixel_values(images))


@register_reward("aesthetic", differentiable=True, uses_prompts=False,
                 weights="download: openai ViT-L-14 (open_clip) + trl-lib/ddpo-aesthetic-predictor")
def build_aesthetic(model: str = "ViT-L-14", pretrained: str | None = "openai", head: str = DEFAULT_HEAD,
                    batch_size: int = 16, device: str = "cpu", dtype: str = "float32", bt_scale: float = 1.0) -> Reward:
    """LAION aesthetic score. ``model``/``pretrained``: the CLIP backbone (see ``clip``); ``head``: the MLP
    state-dict file, a local path or ``org/repo/filename`` on the hub."""
    device = resolve_device(device, "aesthetic")
    head_module = load_aesthetic_head(resolve_hub_file(head, "aesthetic", "head"), device)
    clip_model, _, preprocess = load_open_clip("aesthetic", model, pretrained, device=device)
    embed_dim = getattr(clip_model.visual, "output_dim", None)
    if embed_dim is not None and embed_dim != head_module.layers[0].in_features:
        raise UserError(f"reward 'aesthetic': head expects {head_module.layers[0].in_features}-d embeddings but "
                        f"model='{model}' gives {embed_dim}-d; use the CLIP the head was trained on (ViT-L-14)")
    reward = AestheticScore(clip_model, preprocess, head_module, batch_size=batch_size, bt_scale=bt_scale,
                            dtype=resolve_dtype(dtype, device, "aesthetic"))
    return reward.to(device)  # the modules are already there; this moves the reward's empty device anchor
