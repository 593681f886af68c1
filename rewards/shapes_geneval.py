"""``shapes_geneval``: the shapes world's verifiable reward (GenEval's rules on a pixel detector).

The prompt is parsed with the world's grammar (``shapes_world.parse_caption``); the image is read
by pixel analysis:

1. the image is averaged down to the world's GRID x GRID cells, and every cell is given the
   nearest palette colour or the background, or none when it is farther than ``color_tolerance``
   (RGB distance on a 0-255 scale) from all of them;
2. the cells of each colour are split into 4-connected components; components of fewer than
   ``min_cells`` cells are dropped as noise;
3. a component's shape comes from its bounding-box corners (a square fills all four, an upright
   triangle the two bottom ones, a circle none) checked against its fill ratio (square ~1,
   circle ~pi/4, triangle ~1/2); a component whose two cues agree and whose box is roughly
   square gets confidence 0.95, otherwise 0.5 (below GenEval's 0.9 counting threshold);
4. the detections and the spec go to ``geneval_rules.evaluate`` (strict by default;
   ``partial=True`` gives the share of constraints met).

Not differentiable. Works at any resolution; boxes and masks are returned in image pixels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import Reward
from .geneval_rules import Detection, GenEvalSpec, evaluate
from .image_ops import to_uint8_hwc
from .registry import register_reward
from .shapes_world import BACKGROUND, GRID, PALETTE

_NAMES = ("background",) + tuple(PALETTE)
_RGB = np.asarray([BACKGROUND] + list(PALETTE.values()), dtype=np.float32)  # [K, 3]


def color_labels(image: np.ndarray, color_tolerance: float = 90.0) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W]: 0 background, k >= 1 the k-th palette colour, -1 none."""
    distance = np.linalg.norm(image[:, :, None, :].astype(np.float32) - _RGB[None, None], axis=-1)  # [H, W, K]
    labels = distance.argmin(-1)
    return np.where(distance.min(-1) <= color_tolerance, labels, -1)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool [H, W] mask: (labels [H, W] with 0 = off and 1..n, n)."""
    height, width = mask.shape
    big = height * width + 1
    labels = np.where(mask, np.arange(1, big).reshape(height, width), big)
    while True:  # min-label propagation; converges in at most (longest path) sweeps
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    ids = np.unique(labels[mask])
    relabel = np.zeros(big + 1, dtype=np.int64)
    relabel[ids] = np.arange(1, len(ids) + 1)
    return np.where(mask, relabel[np.minimum(labels, big)], 0), len(ids)


def classify_shape(component: np.ndarray) -> tuple[str, float]:
    """A component's bool cell mask cropped to its box -> (shape name, confidence); corner patches
    are 15% of the box side (one cell for the world's 5-7 cell objects)."""
    height, width = component.shape
    fill = component.mean()
    k_h, k_w = max(1, round(0.15 * height)), max(1, round(0.15 * width))
    top = (component[:k_h, :k_w].mean() + component[:k_h, -k_w:].mean()) / 2
    bottom = (component[-k_h:, :k_w].mean() + component[-k_h:, -k_w:].mean()) / 2
    if top > 0.5 and bottom > 0.5:
        shape, fill_ok = "square", fill > 0.9
    elif bottom > 0.4 and top < 0.3:
        shape, fill_ok = "triangle", 0.4 < fill < 0.78
    elif top < 0.3 and bottom < 0.3:
        shape, fill_ok = "circle", 0.65 < fill < 0.93
    else:
        shape = "square" if fill > 0.85 else ("circle" if fill > 0.65 else "triangle")
        fill_ok = False
    squareish = 0.7 <= width / height <= 1 / 0.7
    return shape, (0.95 if fill_ok and squareish else 0.5)


def to_grid(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float [GRID, GRID, 3]: the mean colour of each cell."""
    height, width = image.shape[:2]
    if height % GRID == 0 and width % GRID == 0:
        return image.reshape(GRID, height // GRID, GRID, width // GRID, 3).astype(np.float32).mean(axis=(1, 3))
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((GRID, GRID), Image.Resampling.BOX), dtype=np.float32)


def detect_shapes(image: np.ndarray, min_cells: int = 7, color_tolerance: float = 90.0) -> list[Detection]:
    """Every shape in a world image. image: uint8 [H, W, 3] -> detections with pixel boxes
    (x0, y0, x1, y1; x1/y1 exclusive) and [H, W] masks."""
    height, width = image.shape[:2]
    labels = color_labels(to_grid(image), color_tolerance)
    sx, sy = width / GRID, height / GRID
    rows, cols = np.arange(height) * GRID // height, np.arange(width) * GRID // width
    detections = []
    for k, name in enumerate(_NAMES[1:], start=1):
        components, n = connected_components(labels == k)
        for index in range(1, n + 1):
            cells = components == index
            if cells.sum() < min_cells:
                continue
            ys, xs = np.nonzero(cells)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            shape, score = classify_shape(cells[y0:y1, x0:x1])
            box = (float(x0 * sx), float(y0 * sy), float(x1 * sx), float(y1 * sy))
            detections.append(Detection(shape, box, score, cells[rows][:, cols], name))
    return detections


@lru_cache(maxsize=4096)
def _spec_of(prompt: str) -> GenEvalSpec:
    from .shapes_world import parse_caption

    return parse_caption(prompt)


def score_image(image: np.ndarray, prompt: str, partial: bool = False) -> tuple[float, dict]:
    """(score, details) of one uint8 [H, W, 3] image against one grammar caption."""
    return evaluate(_spec_of(prompt), detect_shapes(image), partial=partial)


class ShapesGenEvalReward(Reward):
    """GenEval's strict (or partial) score of shapes-world images; see the module docstring."""

    def __init__(self, partial: bool = False, batch_size: int | None = None) -> None:
        super().__init__("shapes_geneval", differentiable=False, batch_size=batch_size, bt_scale=10.0, weightless=True)
        self.partial = bool(partial)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        for prompt in dict.fromkeys(prompts):
            _spec_of(prompt)  # a prompt outside the grammar fails before any image is read
        scores = [score_image(array, prompt, self.partial)[0] for array, prompt in zip(to_uint8_hwc(images), prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register_reward("shapes_geneval", differentiable=False, weights="none")
def build_shapes_geneval(partial: bool = False, batch_size: int | None = None) -> Reward:
    """GenEval's rules on the shapes world: 1 if every constraint of the caption holds (partial=true:
    the share met). Prompts must be in the world's grammar ('a red circle left of a square')."""
    return ShapesGenEvalReward(partial=partial, batch_size=batch_size)
