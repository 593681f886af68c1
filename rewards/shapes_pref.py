"""``shapes_pref``: a small learned, differentiable image-text scorer for the shapes world.

A stand-in for PickScore / HPS on the shapes world: it was trained (``diffalign.world_pref``) to
predict the gold ``shapes_geneval`` partial score from world images, edited world images and
samples of the shapes models, so it agrees with the gold reward on ordinary images (Spearman
recorded in its manifest) but, being a small network, can be over-optimised by a method that
climbs its gradient: the setting for studying reward hacking.

Architecture (``ShapesPrefNet``, ~0.2 M parameters): the image, resized to 64 px and averaged to
the world's 16 x 16 cells, goes through three 3x3 convolutions whose channels are scaled and
shifted by the caption's embedding (FiLM); the caption is read word by word (one slot per
position, words from the world's grammar) by a two-layer MLP. Output: sigmoid(logit) in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.errors import UserError

from .base import Reward
from .registry import register_reward
from .shapes_world import COLORS, GRID, NUMBER_WORDS, RELATIONS, SHAPES

VOCAB = ("<pad>", "<unk>") + tuple(dict.fromkeys(
    ["a", "photo", "of", "and"] + list(NUMBER_WORDS) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
    + [w for rel in RELATIONS for w in rel.split()]
))
MAX_WORDS = 12
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "shapes_pref" / "shapes_pref.safetensors"


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Captions -> word ids [B, MAX_WORDS] (0 = padding, 1 = a word outside the grammar)."""
    index = {w: i for i, w in enumerate(VOCAB)}
    rows = []
    for prompt in prompts:
        words = prompt.lower().strip().rstrip(".").split()[:MAX_WORDS]
        ids = [index.get(w, 1) for w in words]
        rows.append(ids + [0] * (MAX_WORDS - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class ShapesPrefNet(nn.Module):
    """(images [B, 3, H, W] in [0, 1], word ids [B, MAX_WORDS]) -> logits [B]."""

    def __init__(self, width: int = 48, text_width: int = 128) -> None:
        super().__init__()
        self.width = width
        self.words = nn.Embedding(len(VOCAB), 16)
        self.text = nn.Sequential(nn.Linear(MAX_WORDS * 16, text_width), nn.GELU(), nn.Linear(text_width, text_width),
                                  nn.GELU())
        self.film = nn.Linear(text_width, 6 * width)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(width * 2 + text_width, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(images, GRID) * 2 - 1  # [B, 3, 16, 16] in [-1, 1]
        text = self.text(self.words(word_ids).flatten(1))
        scales = self.film(text).view(-1, 6, self.width, 1, 1)
        x = cells
        for i, conv in enumerate((self.conv1, self.conv2, self.conv3)):
            x = F.gelu(conv(x) * (1 + scales[:, 2 * i]) + scales[:, 2 * i + 1])
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.head(torch.cat([pooled, text], dim=1)).squeeze(1)


def load_shapes_pref_net(path: str | Path | None = None) -> ShapesPrefNet:
    """The net with weights from ``path`` (a .safetensors file; its sibling config.json gives the
    widths) or the shipped ones."""
    from safetensors.torch import load_file

    file = Path(path) if path is not None else SHIPPED_WEIGHTS
    if not file.is_file():
        raise UserError(f"reward 'shapes_pref': weights {file} not found; rebuild them with "
                        f"`python -m diffalign.world_pref --out {file}` or set weights=/path/to/shapes_pref.safetensors")
    config_file = file.with_name("config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    net = ShapesPrefNet(**{k: config[k] for k in ("width", "text_width") if k in config})
    net.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
    return net.eval().requires_grad_(False)


class ShapesPrefReward(Reward):
    """sigmoid(ShapesPrefNet(image, caption)) in [0, 1]; differentiable w.r.t. the images."""

    def __init__(self, net: ShapesPrefNet, batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__("shapes_pref", differentiable=True, batch_size=batch_size, bt_scale=10.0)
        self.net = net
        if device is not None:
            self.to(device)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.net(images.float(), tokenize(prompts).to(images.device)))


@register_reward("shapes_pref", differentiable=True, weights="bundled: rewards/shapes_pref/ (python -m diffalign.world_pref rebuilds)")
def build_shapes_pref(weights: str | None = None, batch_size: int | None = None, device: str | None = None) -> Reward:
    """The shapes world's learned reward (shipped weights; ``weights`` = another .safetensors)."""
    return ShapesPrefReward(load_shapes_pref_net(weights), batch_size=batch_size, device=device)
