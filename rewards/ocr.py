"""``ocr``: Flow-GRPO's text-rendering reward (Liu et al. 2025, arXiv 2505.05470; yifan123/flow_grpo ocr.py).

The target is the part of the prompt between the first pair of double quotes
(``'a sign that says "hello world"'`` -> ``hello world``). Recognised text and target are lower-cased
and stripped of spaces; then

    ocr(image, prompt) = 1                                  if target is contained in the text
                       = 1 - min(edit_distance(text, target), len(target)) / len(target)   otherwise

in [0, 1]. The recogniser is PP-OCRv4 (detection + recognition, the model family Flow-GRPO runs
through PaddleOCR) as the ONNX models that the ``rapidocr-onnxruntime`` wheel ships inside the
package: no download, CPU only. As in Flow-GRPO: no angle classifier, lines kept when their
recognition score passes the recogniser's drop threshold (0.5), lines concatenated in reading order,
and the RGB array handed to the OCR as is. Edit distance: Levenshtein from ``rapidfuzz``. Install the
``ocr`` extra (``pip install 'diffalign[ocr]'``). Not differentiable.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.errors import UserError

from .base import Reward
from .image_ops import to_uint8_hwc
from .registry import register_reward
from .weights import _first_line


def ocr_target(prompt: str) -> str:
    """The text an image should show: the prompt's first double-quoted part, as written.

    Raises:
        UserError: the prompt has no ``"..."`` part, or it is empty.
    """
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise UserError(f"reward 'ocr': prompt {prompt!r} has no text in double quotes to render; "
                        f"write the text to render as e.g. 'a sign that says \"OPEN\"'")
    return parts[1]


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalisation: lower case, spaces removed."""
    return text.replace(" ", "").lower()


def ocr_similarity(recognised: str, target: str) -> float:
    """1 if the normalised target is in the normalised text, else 1 - min(distance, len) / len. In [0, 1]."""
    from rapidfuzz.distance import Levenshtein

    text, goal = normalize_text(recognised), normalize_text(target)
    if not goal:
        raise UserError("reward 'ocr': the target text is empty after removing spaces")
    if goal in text:
        return 1.0
    distance = min(Levenshtein.distance(text, goal), len(goal))
    return 1.0 - distance / len(goal)


class OCRReward(Reward):
    """Edit-distance similarity between the text PP-OCR reads in each image and the prompt's quoted text."""

    def __init__(self, engine: Any, *, batch_size: int | None, bt_scale: float, device: str | None) -> None:
        super().__init__("ocr", differentiable=False, batch_size=batch_size, bt_scale=bt_scale, weightless=device is None)
        self.engine = engine
        if device is not None:
            self.to(device)

    def recognise(self, image: Any) -> str:
        """All text lines PP-OCR finds in one uint8 [H, W, 3] RGB array, concatenated in reading order."""
        result, _ = self.engine(image, use_cls=False)
        return "".join(line[1] for line in result or [])

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = [ocr_target(prompt) for prompt in prompts]  # a bad prompt fails before any OCR runs
        scores = [ocr_similarity(self.recognise(array), target) for array, target in zip(to_uint8_hwc(images), targets)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register_reward("ocr", differentiable=False, weights="bundled: PP-OCRv4 in rapidocr-onnxruntime (ocr extra)")
def build_ocr(batch_size: int | None = None, threads: int = -1, drop_score: float = 0.5,
              device: str | None = None, bt_scale: float = 10.0) -> Reward:
    """PP-OCRv4 text-rendering reward in [0, 1]. ``threads``: onnxruntime threads per call (-1: its
    default); ``drop_score``: lines recognised with a lower confidence are ignored (PaddleOCR's 0.5);
    ``device`` only says where the scores go (the OCR itself runs on the CPU)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
        import rapidfuzz  # noqa: F401  the edit distance; checked here so a missing extra fails at build time
    except ImportError as error:
        if error.name is None and "lib" in str(error):  # OpenCV without its system libraries (libGL, glib)
            raise UserError(f"reward 'ocr': OpenCV, which rapidocr uses, cannot load a system library "
                            f"({_first_line(error)}); install it, e.g. apt-get install libgl1 libglib2.0-0") from error
        raise UserError(f"reward 'ocr' needs the ocr extra ({error.name} is missing); "
                        f"pip install 'diffalign[ocr]' (rapidocr-onnxruntime, rapidfuzz)") from error
    if not 0.0 <= float(drop_score) <= 1.0:
        raise UserError(f"reward 'ocr': drop_score must be in [0, 1], got {drop_score!r}")
    # PaddleOCR's detector sizing, which Flow-GRPO runs with: images up to 960 px are not resized
    # (rapidocr's own default enlarges the shorter side to 736).
    engine = RapidOCR(text_score=float(drop_score), use_cls=False, det_limit_type="max",
                      intra_op_num_threads=int(threads), inter_op_num_threads=int(threads))
    return OCRReward(engine, batch_size=batch_size, bt_scale=bt_scale, device=device)
