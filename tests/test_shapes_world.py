"""The shapes world: the grammar reads every caption it writes, world images score 1.0 under
shapes_geneval on their caption, and edited images (wrong colour, count, position) score less."""

import numpy as np
import pytest
import torch

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.shapes_geneval import connected_components, detect_shapes
from diffalign.rewards.shapes_world import (
    BACKGROUND,
    HELD_OUT_PAIRS,
    HELD_OUT_PROMPTS,
    HELD_OUT_SPECS,
    PALETTE,
    TRAIN_PROMPTS,
    TRAIN_SPECS,
    all_specs,
    draw,
    parse_caption,
    render,
    sample_captions,
    scene_for,
)


def to_tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_grammar_parses_every_caption_it_emits():
    specs = all_specs()
    assert len(specs) == 126 and len({s.prompt for s in specs}) == 126
    assert {s.tag for s in specs} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for spec in specs:
        assert parse_caption(spec.prompt) == spec


def test_general_captions_and_errors():
    spec = parse_caption("A photo of two red circles and a blue square.")
    assert spec.to_metadata()["include"] == [{"class": "circle", "count": 2, "color": "red"},
                                             {"class": "square", "count": 1, "color": "blue"}]
    assert spec.to_metadata()["exclude"] == [{"class": "circle", "count": 3}]
    position = parse_caption("a red triangle above a square")
    assert position.include[1].position == ("above", 0) and position.include[1].color == "red"
    with pytest.raises(UserError, match="cannot parse 'a dog' in caption 'a dog'"):
        parse_caption("a dog")
    with pytest.raises(UserError, match="the number and the noun disagree"):
        parse_caption("two circle")


def test_held_out_pairs_are_never_named_together_in_training_captions():
    assert len(HELD_OUT_PAIRS) == 12 and len(TRAIN_PROMPTS) == 102 and len(HELD_OUT_PROMPTS) == 24
    named = [{(r.color, r.cls) for r in spec.include if r.color} for spec in TRAIN_SPECS]
    assert not any(pair <= bindings for pair in HELD_OUT_PAIRS for bindings in named)
    # Every held-out prompt is a colour attribution naming one held-out pair; both word orders are held out.
    assert {s.tag for s in HELD_OUT_SPECS} == {"color_attr"}
    for pair in HELD_OUT_PAIRS:
        assert sum({(r.color, r.cls) for r in s.include} == pair for s in HELD_OUT_SPECS) == 2
    # Each of the 12 bindings is in two held-out pairs and named in training, alone and in pairs.
    bindings = [b for pair in HELD_OUT_PAIRS for b in pair]
    assert len(set(bindings)) == 12 and all(bindings.count(b) == 2 for b in bindings)
    for color, shape in set(bindings):
        assert f"a {color} {shape}" in TRAIN_PROMPTS
        assert sum((color, shape) in b for b, s in zip(named, TRAIN_SPECS) if s.tag == "color_attr") == 8


def test_caption_weights_change_how_often_each_category_is_drawn():
    tag_of = {s.prompt: s.tag for s in TRAIN_SPECS}
    plain = sample_captions(600, seed=5)
    assert sample_captions(600, seed=5, tag_weights={}) == plain  # no weights: the same draws as always
    counts = {tag: 0 for tag in set(tag_of.values())}
    for caption in sample_captions(600, seed=5, tag_weights={"color_attr": 5.0}):
        counts[tag_of[caption]] += 1
    # color_attr weighs 5 of 10: about 300 of 600; each other category about 60
    assert 250 < counts["color_attr"] < 350 and all(20 < n < 100 for tag, n in counts.items() if tag != "color_attr")
    assert set(sample_captions(50, seed=1, tag_weights={"color_attr": 1.0})) <= set(TRAIN_PROMPTS)


def test_draw_is_deterministic_and_pixel_art():
    a, b = draw("three squares", 7), draw("three squares", 7)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, draw("three squares", 8))
    assert np.array_equal(a[::4, ::4].repeat(4, 0).repeat(4, 1), a)  # one colour per 4x4 cell


def test_every_world_image_scores_one_on_its_caption():
    reward = load_reward("shapes_geneval")
    assert reward.differentiable is False
    specs = all_specs()
    images = to_tensor([draw(s.prompt, seed) for s in specs for seed in (0, 1)])
    prompts = [s.prompt for s in specs for _ in (0, 1)]
    assert reward(images, prompts).tolist() == [1.0] * len(prompts)


def test_detector_reads_shapes_colours_and_boxes():
    image = draw("a red circle and a blue square", 3)
    found = sorted((d.label, d.color, d.score) for d in detect_shapes(image))
    assert found == [("circle", "red", 0.95), ("square", "blue", 0.95)]
    for det in detect_shapes(image):
        x0, y0, x1, y1 = (int(v) for v in det.box)
        assert det.mask.shape == (64, 64) and det.mask[y0:y1, x0:x1].any() and not det.mask[:y0].any()


def test_edited_images_score_less():
    reward = load_reward("shapes_geneval")
    partial = load_reward("shapes_geneval:partial=true")

    # Wrong colour: repaint the red circle green.
    image = draw("a red circle", 0)
    recoloured = image.copy()
    recoloured[(image == PALETTE["red"]).all(-1)] = PALETTE["green"]
    # Wrong count: three triangles with one painted over by the background.
    scene = scene_for(parse_caption("three triangles"), np.random.default_rng(0))
    fewer = render(scene[:2])
    # Wrong position: "a circle left of a square" mirrored left-right.
    left = draw("a circle left of a square", 0)
    mirrored = left[:, ::-1].copy()
    # Wrong colour binding: swap the two colours.
    attr = draw("a red circle and a blue square", 0)
    swapped = attr.copy()
    swapped[(attr == PALETTE["red"]).all(-1)] = PALETTE["blue"]
    swapped[(attr == PALETTE["blue"]).all(-1)] = PALETTE["red"]

    prompts = ["a red circle", "three triangles", "a circle left of a square", "a red circle and a blue square"]
    originals = to_tensor([image, render(scene), left, attr])
    edited = to_tensor([recoloured, fewer, mirrored, swapped])
    assert reward(originals, prompts).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert reward(edited, prompts).tolist() == [0.0, 0.0, 0.0, 0.0]
    # Partial credit: colour 1/2 (count holds), count 1/2 (exclude holds), position 2/3, binding 2/4.
    assert partial(edited, prompts).tolist() == pytest.approx([0.5, 0.5, 2 / 3, 0.5])
    # An empty board meets nothing but the exclude clause.
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert partial(to_tensor([blank]), ["three triangles"]).tolist() == [0.5]


def test_prompt_outside_grammar_is_a_user_error():
    with pytest.raises(UserError, match="cannot parse 'a cat'"):
        load_reward("shapes_geneval")(torch.zeros(1, 3, 64, 64), ["a cat"])


def test_connected_components_by_hand():
    mask = np.array([[1, 1, 0, 1],
                     [0, 1, 0, 1],
                     [1, 0, 0, 0]], dtype=bool)
    labels, n = connected_components(mask)
    assert n == 3
    # Numbered in raster order of their first cell.
    assert labels.tolist() == [[1, 1, 0, 2], [0, 1, 0, 2], [3, 0, 0, 0]]
