"""GenEval's rules (Ghosh et al. 2023), detector-agnostic: metadata + detections -> score.

One evaluator, shared by the shapes world's pixel detector (``shapes_geneval``) and by the
Mask2Former + CLIP detector (``geneval``). It follows djghosh13/geneval,
``evaluation/evaluate_images.py`` (commit 16f1681):

- a detection counts when its score is above 0.3 (0.9 for ``tag == "counting"``), at most 16 per
  class, most confident first, no extra NMS (``max_overlap`` 1.0);
- ``include`` clauses are AND-ed: the ``count`` most confident detections of the class must exist;
  with ``color``, at least ``count`` of them must have that colour; with ``position = (relation, i)``
  every one of them must stand in ``relation`` to every object matched by include clause ``i``;
- ``exclude`` clauses are OR-ed: ``{"class": c, "count": n}`` fails when ``n`` or more ``c`` are found
  ("fewer than n");
- a relation ("left of", "right of", "above", "below") holds when the centre offset, shrunk on each
  axis by 0.1 x (sum of the two boxes' sizes), points mostly (> 0.5 of the unshrunk offset's length)
  that way. Image y grows downwards, so "above" is a negative dy.

Strict mode gives 1.0 when every clause holds, else 0.0 (GenEval's ``correct``). ``partial=True``
gives the share of constraints met, where each include clause contributes a count constraint plus
one for its colour and one for its position, and each exclude clause one. As in GenEval, a colour
is only checked once the count holds, and a position once count and colour hold; an unchecked
constraint counts as not met.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffalign.errors import UserError

# GenEval's defaults (evaluate_images.py, ``--options``).
DETECTION_THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

ColorOf = Callable[[list["Detection"], str], list[str]]


@dataclass
class Detection:
    """One detected object in one image.

    Attributes:
        label: class name ("circle", or a COCO class such as "dog").
        box: (x0, y0, x1, y1) in pixels, y downwards.
        score: detector confidence in [0, 1].
        mask: optional [H, W] bool mask of the object.
        color: the object's colour name, if the detector classified it.
    """

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    mask: "np.ndarray | None" = None
    color: str | None = None


@dataclass(frozen=True)
class Requirement:
    """One include/exclude clause: ``count`` objects of ``cls`` (with a colour / a relation)."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class GenEvalSpec:
    """A parsed GenEval metadata line (``evaluation_metadata.jsonl``)."""

    tag: str
    prompt: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = field(default=())

    def to_metadata(self) -> dict[str, Any]:
        """Back to GenEval's JSON schema (``position`` as a [relation, index] list)."""
        def clause(req: Requirement) -> dict[str, Any]:
            out: dict[str, Any] = {"class": req.cls, "count": req.count}
            if req.color is not None:
                out["color"] = req.color
            if req.position is not None:
                out["position"] = [req.position[0], req.position[1]]
            return out

        meta: dict[str, Any] = {"tag": self.tag, "include": [clause(r) for r in self.include]}
        if self.exclude:
            meta["exclude"] = [clause(r) for r in self.exclude]
        meta["prompt"] = self.prompt
        return meta


def _requirement(obj: Any, where: str, index: int, n_before: int) -> Requirement:
    if not isinstance(obj, Mapping) or "class" not in obj or "count" not in obj:
        raise UserError(f"GenEval metadata: {where}[{index}] must be a mapping with 'class' and 'count', got {obj!r}")
    count = obj["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"GenEval metadata: {where}[{index}].count must be an integer >= 1, got {count!r}")
    position = obj.get("position")
    if position is not None:
        if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                or not isinstance(position[1], int) or not 0 <= position[1] < n_before):
            raise UserError(
                f"GenEval metadata: {where}[{index}].position must be [relation, index of an earlier include "
                f"clause] with relation one of {', '.join(RELATIONS)}; got {position!r}"
            )
        position = (str(position[0]), int(position[1]))
    color = obj.get("color")
    if color is not None and not isinstance(color, str):
        raise UserError(f"GenEval metadata: {where}[{index}].color must be a string, got {color!r}")
    return Requirement(str(obj["class"]), int(count), color, position)


def parse_metadata(obj: Mapping[str, Any]) -> GenEvalSpec:
    """GenEval's JSONL schema (``tag``, ``include``, optional ``exclude``, ``prompt``) -> GenEvalSpec.

    Raises:
        UserError: a missing key, a malformed clause, or a position that points at no earlier clause.
    """
    if not isinstance(obj, Mapping) or "include" not in obj or "tag" not in obj:
        raise UserError(f"GenEval metadata must be a mapping with 'tag' and 'include', got {obj!r}")
    include_raw = obj["include"]
    if not isinstance(include_raw, (list, tuple)) or not include_raw:
        raise UserError(f"GenEval metadata: 'include' must be a non-empty list, got {include_raw!r}")
    include = tuple(_requirement(o, "include", i, i) for i, o in enumerate(include_raw))
    exclude = tuple(_requirement(o, "exclude", i, 0) for i, o in enumerate(obj.get("exclude") or []))
    return GenEvalSpec(str(obj["tag"]), str(obj.get("prompt", "")), include, exclude)


def select_detections(
    detections: Sequence[Detection], tag: str, *, threshold: float = DETECTION_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """Group detections by class, most confident first, as GenEval keeps them.

    Keeps scores strictly above ``threshold`` (``counting_threshold`` for counting prompts), at most
    ``max_objects`` per class, then greedy NMS at ``nms_threshold`` IoU (1.0: none).
    """
    cut = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > cut:
            by_class.setdefault(det.label, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        ordering = sorted(dets, key=lambda d: -d.score)[:max_objects]
        chosen: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            chosen.append(best)
            if nms_threshold < 1:
                ordering = [d for d in ordering if box_iou(best.box, d.box) < nms_threshold]
        kept[label] = chosen
    return kept


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel areas ((x1 - x0 + 1) * (y1 - y0 + 1))."""
    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations of box A to box B (a subset of RELATIONS; empty when they are too close)."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colors_from_detections(found: list[Detection], cls: str) -> list[str]:
    missing = [d for d in found if d.color is None]
    if missing:
        raise ValueError(f"a colour clause on '{cls}' needs Detection.color or a color_of classifier")
    return [d.color for d in found]  # type: ignore[misc]


def evaluate(
    spec: GenEvalSpec, detections: Sequence[Detection], *, partial: bool = False,
    color_of: ColorOf | None = None, threshold: float = DETECTION_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD, position_threshold: float = POSITION_THRESHOLD,
) -> tuple[float, dict[str, Any]]:
    """Score one image's detections against one spec.

    Args:
        spec: from :func:`parse_metadata`.
        detections: everything the detector found (unthresholded; this applies GenEval's cuts).
        partial: False: 1.0 if every clause holds else 0.0; True: the share of constraints met.
        color_of: ``color_of(detections, class_name) -> colour names``, called only for colour
            clauses (GenEval: CLIP zero-shot on the masked crops). None: use ``Detection.color``.

    Returns:
        (score in [0, 1], details) with details ``correct`` (bool), ``reasons`` (GenEval's failure
        messages), ``constraints`` ([(name, met)]) and ``counts`` ({class: kept detections}).
    """
    objects = select_detections(detections, spec.tag, threshold=threshold, counting_threshold=counting_threshold,
                                max_objects=max_objects, nms_threshold=nms_threshold)
    classify = color_of or _colors_from_detections
    constraints: list[tuple[str, bool]] = []
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []

    for req in spec.include:
        found = objects.get(req.cls, [])[: req.count]
        matched = len(found) >= req.count
        constraints.append((f"count {req.cls}>={req.count}", matched))
        if not matched:
            reasons.append(f"expected {req.cls}>={req.count}, found {len(found)}")
        if req.color is not None:
            color_ok = False
            if matched:
                colors = list(classify(found, req.cls))
                color_ok = colors.count(req.color) >= req.count
                if not color_ok:
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reasons.append(f"expected {req.color} {req.cls}>={req.count}, found "
                                   f"{colors.count(req.color)} {req.color}; and {seen}")
            constraints.append((f"color {req.cls}={req.color}", color_ok))
            matched = matched and color_ok
        if req.position is not None:
            relation, group = req.position
            position_ok = False
            if matched:
                targets = matched_groups[group]
                if targets is None:
                    reasons.append(f"no target for {req.cls} to be {relation}")
                else:
                    position_ok = True
                    for obj in found:
                        for target in targets:
                            true_rels = relative_position(obj.box, target.box, position_threshold)
                            if relation not in true_rels:
                                position_ok = False
                                reasons.append(f"expected {req.cls} {relation} target, found "
                                               f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not position_ok:
                            break
            constraints.append((f"position {req.cls} {relation} #{group}", position_ok))
            matched = matched and position_ok
        matched_groups.append(found if matched else None)

    for req in spec.exclude:
        n_found = len(objects.get(req.cls, []))
        ok = n_found < req.count
        constraints.append((f"exclude {req.cls}<{req.count}", ok))
        if not ok:
            reasons.append(f"expected {req.cls}<{req.count}, found {n_found}")

    correct = all(met for _, met in constraints)
    score = sum(met for _, met in constraints) / len(constraints) if partial else float(correct)
    details = {"correct": correct, "reasons": reasons, "constraints": constraints,
               "counts": {k: len(v) for k, v in objects.items()}}
    return score, details
