"""The shapes world: captions, GenEval metadata and images of coloured shapes, numpy/PIL only.

A procedural stand-in for "SD3.5 + GenEval" that runs on a laptop CPU. An image holds 1-4 objects
(circle, square, triangle) in a small palette on a plain light-grey background; its caption comes
from a grammar modelled on GenEval's six categories and maps to GenEval's metadata:

    single_object   "a circle"
    two_object      "a circle and a square"
    counting        "three triangles"                       (include 3, exclude 4)
    colors          "a red circle"
    position        "a circle left of a square"             (the square is include[0])
    color_attr      "a red circle and a blue square"

``parse_caption`` also reads the general form these are instances of: noun phrases
``(a|one|two|three|four) [colour] shape[s]`` joined by "and", or two single noun phrases joined by a
relation ("left of", "right of", "above", "below"); an optional "a photo of " prefix and a final
full stop are ignored.

Train / held-out: every colour-shape binding ("a red square") is named in training captions, but
twelve pairs of bindings (``HELD_OUT_PAIRS``) are never named together: the 24 colour-attribution
captions that name both bindings of such a pair (in either order) are held out. So a held-out
prompt asks for bindings the model knows, in a combination it has never seen, and its bag of words
("red", "square", "green", "circle") is also the bag of a training caption with the colours
swapped. Everything is deterministic by seed: ``draw(caption, seed)`` always gives the same image.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from diffalign.errors import UserError

from .geneval_rules import GenEvalSpec, Requirement, relative_position

SHAPES = ("circle", "square", "triangle")
# GenEval colour names; RGB values far apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (40, 165, 70),
    "blue": (50, 90, 225),
    "yellow": (235, 205, 40),
}
COLORS = tuple(PALETTE)
BACKGROUND = (232, 232, 232)
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
IMAGE_SIZE = 64
# Scenes live on a GRID x GRID board of cells, drawn as pixel art (each cell a block of
# size/GRID pixels): the shapes VAE keeps one latent per cell, so a world image survives
# encode -> decode exactly. Object sides are MIN_SIZE..MAX_SIZE cells, at least GAP cells apart.
GRID = 16
MIN_SIZE, MAX_SIZE, GAP = 5, 7, 1


# --- captions <-> GenEval metadata ------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "s"


def _phrase(req: Requirement) -> str:
    head = "a" if req.count == 1 else COUNT_WORDS[req.count]
    noun = req.cls if req.count == 1 else _plural(req.cls)
    return " ".join(w for w in (head, req.color, noun) if w)


def caption_of(spec: GenEvalSpec) -> str:
    """The grammar's caption for a spec (the inverse of :func:`parse_caption`)."""
    if spec.tag == "position":
        target, subject = spec.include
        return f"{_phrase(subject)} {subject.position[0]} {_phrase(target)}"
    return " and ".join(_phrase(r) for r in spec.include)


def _spec(tag: str, include: list[Requirement], exclude: list[Requirement] | None = None) -> GenEvalSpec:
    spec = GenEvalSpec(tag, "", tuple(include), tuple(exclude or ()))
    return GenEvalSpec(tag, caption_of(spec), spec.include, spec.exclude)


def all_specs() -> list[GenEvalSpec]:
    """Every caption the grammar emits for GenEval's six categories (126 of them), in a fixed order."""
    specs = [_spec("single_object", [Requirement(s, 1)]) for s in SHAPES]
    specs += [_spec("two_object", [Requirement(a, 1), Requirement(b, 1)]) for a, b in itertools.permutations(SHAPES, 2)]
    specs += [_spec("counting", [Requirement(s, n)], [Requirement(s, n + 1)]) for s in SHAPES for n in (2, 3, 4)]
    specs += [_spec("colors", [Requirement(s, 1, c)]) for s in SHAPES for c in COLORS]
    specs += [
        _spec("position", [Requirement(b, 1), Requirement(a, 1, position=(rel, 0))])
        for a, b in itertools.permutations(SHAPES, 2) for rel in RELATIONS
    ]
    specs += [
        _spec("color_attr", [Requirement(a, 1, ca), Requirement(b, 1, cb)])
        for a, b in itertools.permutations(SHAPES, 2) for ca, cb in itertools.permutations(COLORS, 2)
    ]
    return specs


def _held_out_pairs() -> tuple[frozenset, ...]:
    """For each pair of shapes, four of its twelve colourings: the second shape's colour is the
    first's moved 1, 2 or 3 places along COLORS (one shift per pair of shapes). Each of the twelve
    bindings is then in two held-out pairs and in eight training captions."""
    pairs = []
    for shift, (a, b) in enumerate(itertools.combinations(SHAPES, 2), 1):
        for i, color in enumerate(COLORS):
            pairs.append(frozenset({(color, a), (COLORS[(i + shift) % len(COLORS)], b)}))
    return tuple(pairs)


HELD_OUT_PAIRS = _held_out_pairs()


def held_out_pair(spec: GenEvalSpec) -> frozenset | None:
    """The pair of ``HELD_OUT_PAIRS`` whose two bindings the spec names, or None."""
    bindings = {(r.color, r.cls) for r in spec.include if r.color}
    return next((pair for pair in HELD_OUT_PAIRS if pair <= bindings), None)


def is_held_out(spec: GenEvalSpec) -> bool:
    """True when the spec names both bindings of a pair in ``HELD_OUT_PAIRS``."""
    return held_out_pair(spec) is not None


def _alignment_sides(pairs: tuple[frozenset, ...]) -> tuple[bool, ...]:
    """Which held-out pairs the alignment methods train on (True) and which they are measured on:
    the first assignment, in a fixed order, with six pairs on each side and every binding in one
    pair of each side (each binding is in two held-out pairs)."""
    for sides in itertools.product((True, False), repeat=len(pairs)):
        counts: dict[tuple[str, str], list[bool]] = {}
        for pair, side in zip(pairs, sides):
            for binding in pair:
                counts.setdefault(binding, []).append(side)
        if sum(sides) * 2 == len(pairs) and all(sorted(v) == [False, True] for v in counts.values()):
            return sides
    raise RuntimeError("no balanced split of the held-out pairs")  # not reached for HELD_OUT_PAIRS


TRAIN_SPECS = tuple(s for s in all_specs() if not is_held_out(s))
HELD_OUT_SPECS = tuple(s for s in all_specs() if is_held_out(s))
TRAIN_PROMPTS = tuple(s.prompt for s in TRAIN_SPECS)
HELD_OUT_PROMPTS = tuple(s.prompt for s in HELD_OUT_SPECS)
# In-distribution single-object prompts (GenEval's single_object and colors tags) and the held-out
# compositional ones (two bound colours never named together in training: all held-out prompts).
SINGLE_OBJECT_PROMPTS = tuple(s.prompt for s in TRAIN_SPECS if s.tag in ("single_object", "colors"))
HELD_OUT_COMPOSITIONAL_PROMPTS = tuple(s.prompt for s in HELD_OUT_SPECS if s.tag == "color_attr")
# Alignment on the world: methods train on the prompts of six held-out pairs and are measured on
# those of the other six (both word orders of a pair stay on one side), so the evaluation prompts
# were seen neither in pretraining nor in alignment.
_ALIGN_SIDE = dict(zip(HELD_OUT_PAIRS, _alignment_sides(HELD_OUT_PAIRS)))
ALIGN_TRAIN_PROMPTS = tuple(s.prompt for s in HELD_OUT_SPECS if _ALIGN_SIDE[held_out_pair(s)])
ALIGN_EVAL_PROMPTS = tuple(s.prompt for s in HELD_OUT_SPECS if not _ALIGN_SIDE[held_out_pair(s)])

_SHAPE_WORD = r"(circle|square|triangle)s?"
_NP = rf"(a|an|one|two|three|four)\s+(?:(red|green|blue|yellow)\s+)?{_SHAPE_WORD}"
_NP_RE = re.compile(rf"^{_NP}$")
_POSITION_RE = re.compile(rf"^({_NP})\s+(left of|right of|above|below)\s+({_NP})$")


def _parse_phrase(text: str, caption: str) -> Requirement:
    match = _NP_RE.match(text.strip())
    if not match:
        raise UserError(f"shapes world: cannot parse {text.strip()!r} in caption {caption!r}; "
                        f"write e.g. 'a red circle', 'three squares', 'a circle left of a blue square'")
    number, color, shape = match.groups()
    count = NUMBER_WORDS[number]
    plural = text.strip().endswith("s")
    if plural != (count > 1):
        raise UserError(f"shapes world: {text.strip()!r} in caption {caption!r}: the number and the noun disagree")
    return Requirement(shape, count, color)


def parse_caption(caption: str) -> GenEvalSpec:
    """A caption of the grammar -> its GenEval spec (``prompt`` is the caption as given).

    Raises:
        UserError: the caption is not in the grammar (the message quotes the part that is not).
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    text = text.removeprefix("a photo of ")
    position = _POSITION_RE.match(text)
    if position:
        subject = _parse_phrase(position.group(1), caption)
        target = _parse_phrase(position.group(6), caption)
        include = (target, Requirement(subject.cls, subject.count, subject.color, (position.group(5), 0)))
        return GenEvalSpec("position", caption, include)
    include = tuple(_parse_phrase(p, caption) for p in text.split(" and "))
    classes = [r.cls for r in include]
    exclude = tuple(Requirement(r.cls, r.count + 1) for r in include if r.count > 1 and classes.count(r.cls) == 1)
    if len(include) == 1:
        tag = "counting" if include[0].count > 1 else ("colors" if include[0].color else "single_object")
    else:
        tag = "color_attr" if any(r.color for r in include) else "two_object"
    return GenEvalSpec(tag, caption, include, exclude)


# --- scenes and rendering ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorldObject:
    """One object: its shape, colour name and bounding box (x0, y0, x1, y1) in grid cells, x1/y1 exclusive."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


def _free(box: tuple[int, int, int, int], placed: list[WorldObject]) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + GAP <= o.box[0] or o.box[2] + GAP <= x0 or y1 + GAP <= o.box[1] or o.box[3] + GAP <= y0
               for o in placed)


def _random_box(rng: np.random.Generator) -> tuple[int, int, int, int]:
    s = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    x0, y0 = (int(v) for v in rng.integers(0, GRID - s + 1, size=2))
    return (x0, y0, x0 + s, y0 + s)


def scene_for(spec: GenEvalSpec, rng: np.random.Generator) -> list[WorldObject]:
    """A random scene that satisfies ``spec``: exactly the objects it names, colours random where the
    spec leaves them open, positions random (for ``position``: the relation holds, and only it)."""
    wanted = [(r.cls, r.color) for r in spec.include for _ in range(r.count)]
    for _ in range(1000):
        placed: list[WorldObject] = []
        for shape, color in wanted:
            color = color or COLORS[int(rng.integers(len(COLORS)))]
            for _ in range(100):
                box = _random_box(rng)
                if _free(box, placed):
                    placed.append(WorldObject(shape, color, box))
                    break
        if len(placed) < len(wanted):
            continue
        if spec.tag == "position":
            relation = spec.include[1].position[0]
            if relative_position(placed[1].box, placed[0].box) != {relation}:
                continue
        return placed
    raise RuntimeError(f"could not place a scene for {spec.prompt!r}")  # not reached for the grammar's specs


def shape_mask(shape: str, side: int) -> np.ndarray:
    """bool [side, side]: the cells a shape fills in its box (upright triangle, apex at the top)."""
    centre = (np.arange(side) + 0.5) - side / 2
    rows, cols = np.meshgrid(centre, centre, indexing="ij")
    if shape == "circle":
        return rows**2 + cols**2 <= (side / 2) ** 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    row_index = np.arange(side)[:, None]
    return np.abs(cols) <= (row_index + 1) / 2


def render(scene: list[WorldObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene: uint8 [size, size, 3] (size a multiple of GRID), plain background, one flat
    colour per cell."""
    if size % GRID:
        raise ValueError(f"image size must be a multiple of {GRID}, got {size}")
    board = np.empty((GRID, GRID, 3), dtype=np.uint8)
    board[:] = BACKGROUND
    for obj in scene:
        x0, y0, x1, y1 = obj.box
        mask = shape_mask(obj.shape, x1 - x0)
        board[y0:y1, x0:x1][mask] = PALETTE[obj.color]
    cell = size // GRID
    return board.repeat(cell, axis=0).repeat(cell, axis=1)


def draw(caption: str, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The world's image for ``caption`` with ``seed``: uint8 [size, size, 3], deterministic."""
    return render(scene_for(parse_caption(caption), np.random.default_rng(seed)), size)


def sample_captions(n: int, seed: int, specs: tuple[GenEvalSpec, ...] = TRAIN_SPECS,
                    tag_weights: dict[str, float] | None = None) -> list[str]:
    """``n`` captions drawn with ``seed``: a GenEval category (uniformly, or in proportion to
    ``tag_weights``, where a missing category weighs 1), then a caption of it uniformly."""
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[str]] = {}
    for spec in specs:
        by_tag.setdefault(spec.tag, []).append(spec.prompt)
    tags = sorted(by_tag)
    p = None
    if tag_weights:
        w = np.array([float(tag_weights.get(t, 1.0)) for t in tags])
        p = w / w.sum()
    out = []
    for _ in range(n):
        # the uniform draw stays rng.integers, so unweighted captions are what they always were
        k = int(rng.integers(len(tags))) if p is None else int(rng.choice(len(tags), p=p))
        pool = by_tag[tags[k]]
        out.append(pool[int(rng.integers(len(pool)))])
    return out
