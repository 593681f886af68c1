"""``geneval``: GenEval's compositional score (Ghosh et al. 2023, arXiv 2310.11513; djghosh13/geneval
``evaluation/evaluate_images.py``) with a Mask2Former detector and CLIP colour classification.

    geneval(image, prompt) = 1 if every clause of the prompt's GenEval metadata holds, else 0
                             (``partial=True``: the share of constraints met)

1. **Detect**: COCO instance-segmentation Mask2Former (``Mask2FormerForUniversalSegmentation``, default
   ``facebook/mask2former-swin-small-coco-instance``, the Swin-S model GenEval runs through mmdet). As
   mmdet's instance post-processing: the 100 best (query, class) pairs by class probability, masks
   = mask logits > 0 at the image's own size (resized from the unpadded input region), score = class
   probability x mean mask probability inside the mask, box = the mask's extent (x1, y1 exclusive).
   Class ``k`` is GenEval's k-th object name (COCO's 80 classes; ``mouse``, ``remote`` and ``keyboard``
   are ``computer mouse``, ``tv remote``, ``computer keyboard`` there).
2. **Colour** (only for clauses with a colour): the object's mask over a grey (#999) canvas, cropped to
   its box, classified zero-shot by CLIP (default open_clip ViT-L-14 ``openai``) over GenEval's ten
   colours with its three templates (``a photo of a {c} {cls}``, ``a photo of a {c}-colored {cls}``,
   ``a photo of a {c} object``; embeddings averaged per colour).
3. **Rules**: :func:`geneval_rules.evaluate` (thresholds 0.3 / 0.9 for counting, 16 per class, the
   position rule), shared with ``shapes_geneval``.

How the metadata reaches the reward: each prompt is either a GenEval metadata line itself (a JSON
object with ``tag``, ``include``, ...), or plain text found in ``metadata=FILE``, a GenEval
``evaluation_metadata.jsonl`` whose ``prompt`` fields key its lines. Training on GenEval prompts
uses the second form (the model sees the plain prompt; the reward looks it up). Not differentiable.
Needs the ``geneval`` extra (scipy, which transformers' Mask2Former imports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.errors import UserError

from .base import Reward
from .clip import load_open_clip
from .geneval_rules import GENEVAL_COLORS, Detection, GenEvalSpec, evaluate, parse_metadata
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, to_uint8_hwc
from .registry import register_reward
from .weights import freeze, load_onto, missing_weights_error, resolve_device, resolve_dtype

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
MAX_PER_IMAGE = 100  # mmdet's Mask2Former test_cfg.max_per_image
CROP_BACKGROUND = (0x99 / 255, 0x99 / 255, 0x99 / 255)  # GenEval's bgcolor "#999"
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def load_metadata_file(path: str) -> dict[str, GenEvalSpec]:
    """A GenEval ``evaluation_metadata.jsonl`` -> {prompt: spec}; a prompt with two different specs is an error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"reward 'geneval': metadata='{path}' is not a file (expected GenEval's evaluation_metadata.jsonl)")
    specs: dict[str, GenEvalSpec] = {}
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            spec = parse_metadata(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"reward 'geneval': {path} line {number} is not JSON ({error.msg})") from error
        except UserError as error:
            raise UserError(f"reward 'geneval': {path} line {number}: {error}") from error
        if not spec.prompt:
            raise UserError(f"reward 'geneval': {path} line {number} has no 'prompt' to key it by")
        if specs.get(spec.prompt, spec) != spec:
            raise UserError(f"reward 'geneval': {path} line {number}: prompt {spec.prompt!r} appears with two different metadata")
        specs[spec.prompt] = spec
    return specs


def instance_detections(class_logits: torch.Tensor, mask_logits: torch.Tensor, class_names: tuple[str, ...],
                        max_per_image: int = MAX_PER_IMAGE) -> list[Detection]:
    """mmdet's Mask2Former instance post-processing for one image.

    Args:
        class_logits: [Q, C + 1] (last = no object).
        mask_logits: [Q, H, W] at the image's own resolution.
        class_names: C names, indexed by class id.

    Returns:
        Up to ``max_per_image`` detections (unthresholded), best first.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = class_logits.float().softmax(-1)[:, :-1].flatten()  # [Q * C], query-major
    top_scores, top = scores.topk(min(max_per_image, scores.numel()))
    labels, queries = top % num_classes, top // num_classes
    masks = mask_logits[queries].float()
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    det_scores = top_scores * mask_scores
    rows, cols = binary.any(dim=2), binary.any(dim=1)  # [K, H], [K, W]
    detections = []
    for k in range(len(top)):
        ys, xs = rows[k].nonzero().flatten(), cols[k].nonzero().flatten()
        box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)) if len(xs) and len(ys) else (0.0,) * 4
        detections.append(Detection(label=class_names[int(labels[k])], box=box, score=float(det_scores[k]),
                                    mask=binary[k].cpu().numpy()))
    detections.sort(key=lambda d: -d.score)
    return detections


class GenEvalReward(Reward):
    """Mask2Former detections + CLIP colours, scored by GenEval's rules (see the module docstring)."""

    def __init__(self, detector: torch.nn.Module, image_processor: Any, clip_model: torch.nn.Module, clip_tokenizer: Any,
                 clip_preprocess_cfg: dict[str, Any], specs: dict[str, GenEvalSpec], *, partial: bool, batch_size: int,
                 bt_scale: float, dtype: torch.dtype) -> None:
        super().__init__("geneval", differentiable=False, batch_size=batch_size, bt_scale=bt_scale)
        self.model = detector
        self.image_processor = image_processor
        self.clip = clip_model
        self.clip_tokenizer = clip_tokenizer
        self.clip_preprocess_cfg = clip_preprocess_cfg
        self.specs = specs
        self.partial = partial
        self.dtype = dtype
        labels = detector.config.num_labels
        self.class_names = GENEVAL_CLASSES if labels == len(GENEVAL_CLASSES) else tuple(
            detector.config.id2label[i] for i in range(labels))
        self._color_classifiers: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ metadata
    def spec_for(self, prompt: str) -> GenEvalSpec:
        """The GenEval spec of a prompt: the prompt itself as a JSON metadata line, or its entry in ``metadata``."""
        if prompt.lstrip().startswith("{"):
            try:
                return parse_metadata(json.loads(prompt))
            except json.JSONDecodeError as error:
                raise UserError(f"reward 'geneval': prompt {prompt[:60]!r} looks like JSON but is not ({error.msg})") from error
        if prompt not in self.specs:
            where = f"the {len(self.specs)} prompts of metadata" if self.specs else "no metadata file"
            raise UserError(f"reward 'geneval': prompt {prompt!r} has no GenEval metadata ({where}); set "
                            f"metadata=/path/to/evaluation_metadata.jsonl holding it, or pass the metadata line as the prompt")
        return self.specs[prompt]

    # ------------------------------------------------------------------ detector
    def detect(self, images: torch.Tensor) -> list[list[Detection]]:
        """images [b, 3, H, W] in [0, 1] -> per image, every detection (best first), boxes in its pixels."""
        height, width = images.shape[-2:]
        inputs = self.image_processor(images=to_uint8_hwc(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.no_grad():
            outputs = self.model(pixel_values=pixels, pixel_mask=inputs["pixel_mask"].to(self.device))
        # mask logits at 1/4 of the padded input -> input size -> unpadded region -> the image's own size
        masks = F.interpolate(outputs.masks_queries_logits.float(), size=pixels.shape[-2:], mode="bilinear",
                              align_corners=False)
        found = []
        for i in range(images.shape[0]):
            valid = inputs["pixel_mask"][i].bool()
            valid_h, valid_w = int(valid.any(1).sum()), int(valid.any(0).sum())
            own = F.interpolate(masks[i : i + 1, :, :valid_h, :valid_w], size=(height, width), mode="bilinear",
                                align_corners=False)[0]
            found.append(instance_detections(outputs.class_queries_logits[i], own, self.class_names))
        return found

    # ------------------------------------------------------------------ colours
    def color_classifier(self, class_name: str) -> torch.Tensor:
        """[D, 10] unit text embeddings, one per colour, averaged over GenEval's three templates (cached)."""
        key = f"{class_name}@{self.device}"  # the cache follows the reward across .to(device)
        if key not in self._color_classifiers:
            columns = []
            with torch.no_grad():
                for color in GENEVAL_COLORS:
                    texts = [t.format(c=color, cls=class_name) for t in COLOR_TEMPLATES]
                    embeds = F.normalize(self.clip.encode_text(self.clip_tokenizer(texts).to(self.device)).float(), dim=-1)
                    columns.append(F.normalize(embeds.mean(0), dim=-1))
            self._color_classifiers[key] = torch.stack(columns, dim=1)
        return self._color_classifiers[key]

    def object_crops(self, image: torch.Tensor, detections: list[Detection]) -> torch.Tensor:
        """GenEval's colour input: the mask over a #999 canvas, cropped to the box, CLIP-preprocessed. -> [n, 3, S, S]"""
        canvas = torch.tensor(CROP_BACKGROUND, device=image.device).view(3, 1, 1)
        crops = []
        for det in detections:
            shown = image if det.mask is None else torch.where(torch.from_numpy(det.mask).to(image.device), image, canvas)
            x0, y0, x1, y1 = (int(round(v)) for v in det.box)
            crop = shown[:, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            cfg = self.clip_preprocess_cfg
            crops.append(clip_preprocess(crop[None].float(), cfg.get("size", 224), cfg.get("mean", OPENAI_CLIP_MEAN),
                                         cfg.get("std", OPENAI_CLIP_STD), cfg.get("interpolation", "bicubic"),
                                         cfg.get("resize_mode", "shortest"))[0])
        return torch.stack(crops)

    def colors_of(self, image: torch.Tensor):
        """``color_of(detections, class_name) -> colour names`` for :func:`geneval_rules.evaluate` on one image."""
        def classify(detections: list[Detection], class_name: str) -> list[str]:
            with torch.no_grad():
                features = F.normalize(self.clip.encode_image(self.object_crops(image, detections).to(self.clip_dtype)).float(), dim=-1)
            logits = 100.0 * features @ self.color_classifier(class_name)
            return [GENEVAL_COLORS[i] for i in logits.argmax(1).tolist()]
        return classify

    @property
    def clip_dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    # ------------------------------------------------------------------ scoring
    def evaluate_images(self, images: torch.Tensor, prompts: list[str]) -> list[tuple[float, dict[str, Any]]]:
        """Per image ``(score, details)`` from :func:`geneval_rules.evaluate` (details: correct, reasons, ...)."""
        specs = [self.spec_for(p) for p in prompts]  # bad prompts fail before the detector runs
        detections = self.detect(images)
        return [evaluate(spec, dets, partial=self.partial, color_of=self.colors_of(image))
                for spec, dets, image in zip(specs, detections, images)]

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        results = self.evaluate_images(images, prompts)
        return torch.tensor([score for score, _ in results], dtype=torch.float32, device=images.device)


@register_reward("geneval", differentiable=False,
                 weights="download: facebook/mask2former-swin-small-coco-instance + openai ViT-L-14 (open_clip)")
def build_geneval(metadata: str | None = None, detector: str = DEFAULT_DETECTOR, clip_model: str = "ViT-L-14",
                  clip_pretrained: str | None = "openai", partial: bool = False, batch_size: int = 8, device: str = "cpu",
                  dtype: str = "float32", bt_scale: float = 10.0) -> Reward:
    """GenEval. ``metadata``: GenEval's ``evaluation_metadata.jsonl`` (prompts not in it must be JSON
    metadata lines); ``detector``: hub id or local directory of a COCO instance Mask2Former;
    ``clip_model`` / ``clip_pretrained``: the colour classifier (open_clip name + tag, or a local dir);
    ``partial``: the share of constraints met instead of GenEval's strict 0/1."""
    try:
        import scipy  # noqa: F401  transformers' Mask2Former imports it
    except ImportError as error:
        raise UserError("reward 'geneval' needs the geneval extra (scipy is missing); pip install 'diffalign[geneval]'") from error
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    device = resolve_device(device, "geneval")
    torch_dtype = resolve_dtype(dtype, device, "geneval")
    specs = load_metadata_file(metadata) if metadata else {}
    try:
        with torch.device(device):  # the pixel decoder's level_embed is made outside the device map otherwise
            model = Mask2FormerForUniversalSegmentation.from_pretrained(detector, **load_onto(device, torch_dtype))
        processor = AutoImageProcessor.from_pretrained(detector)
    except (OSError, ValueError) as error:
        raise missing_weights_error("geneval", detector, "detector", "/path/to/mask2former-swin-small-coco-instance", error) from error
    clip, tokenizer, preprocess = load_open_clip("geneval", clip_model, clip_pretrained, device=device)
    reward = GenEvalReward(freeze(model), processor, clip.to(torch_dtype), tokenizer, preprocess, specs,
                           partial=bool(partial), batch_size=batch_size, bt_scale=bt_scale, dtype=torch_dtype)
    return reward.to(device)  # the weights are already there; this moves the reward's empty device anchor
