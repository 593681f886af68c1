"""GenEval's rules on synthetic detections: every category passes and fails as evaluate_images.py says."""

import pytest

from diffalign.errors import UserError
from diffalign.rewards.geneval_rules import (
    Detection,
    evaluate,
    parse_metadata,
    relative_position,
    select_detections,
)


def det(label, x0, y0, x1, y1, score=1.0, color=None):
    return Detection(label, (x0, y0, x1, y1), score, color=color)


SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
       "prompt": "a photo of a dog and a cat"}
COUNT3 = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}],
          "prompt": "a photo of three cups"}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
# "a dog left of a cat": the target (cat) is include[0], the dog points at it.
POSITION = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a dog left of a cat"}
ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                         {"class": "bus", "count": 1, "color": "blue"}],
        "prompt": "a photo of a red car and a blue bus"}


def score(meta, dets, **kw):
    return evaluate(parse_metadata(meta), dets, **kw)


def test_single_object_pass_fail_and_detection_threshold():
    assert score(SINGLE, [det("dog", 0, 0, 10, 10)])[0] == 1.0
    assert score(SINGLE, [det("cat", 0, 0, 10, 10)])[0] == 0.0
    # GenEval keeps scores strictly above 0.3.
    assert score(SINGLE, [det("dog", 0, 0, 10, 10, score=0.3)])[0] == 0.0
    assert score(SINGLE, [det("dog", 0, 0, 10, 10, score=0.31)])[0] == 1.0


def test_two_object_needs_both():
    assert score(TWO, [det("dog", 0, 0, 5, 5), det("cat", 10, 0, 15, 5)])[0] == 1.0
    s, d = score(TWO, [det("dog", 0, 0, 5, 5)])
    assert s == 0.0 and d["reasons"] == ["expected cat>=1, found 0"]
    assert score(TWO, [det("dog", 0, 0, 5, 5)], partial=True)[0] == 0.5


def test_counting_threshold_and_exclude_fewer_than_n():
    three = [det("cup", 10 * i, 0, 10 * i + 5, 5, score=0.95) for i in range(3)]
    assert score(COUNT3, three)[0] == 1.0
    # Counting prompts keep only scores above 0.9: one at 0.8 leaves two cups.
    weak = three[:2] + [det("cup", 40, 0, 45, 5, score=0.8)]
    assert score(COUNT3, weak)[0] == 0.0
    # Four cups break "exclude cup count 4" (fewer than 4 allowed); partial: 1 of 2 constraints.
    four = three + [det("cup", 60, 0, 65, 5, score=0.95)]
    s, d = score(COUNT3, four)
    assert s == 0.0 and d["reasons"] == ["expected cup<4, found 4"]
    assert score(COUNT3, four, partial=True)[0] == 0.5
    # Two cups: count fails, exclude holds -> 1/2.
    assert score(COUNT3, three[:2], partial=True)[0] == 0.5


def test_colors_from_detection_or_classifier():
    assert score(COLOR, [det("car", 0, 0, 5, 5, color="red")])[0] == 1.0
    assert score(COLOR, [det("car", 0, 0, 5, 5, color="blue")])[0] == 0.0
    # Only the most confident car is checked (count 1): a red one behind a blue one fails.
    dets = [det("car", 0, 0, 5, 5, 0.9, color="blue"), det("car", 9, 0, 14, 5, 0.5, color="red")]
    assert score(COLOR, dets)[0] == 0.0
    calls = []

    def color_of(found, cls):
        calls.append((len(found), cls))
        return ["red"] * len(found)

    assert score(COLOR, [det("car", 0, 0, 5, 5)], color_of=color_of)[0] == 1.0
    assert calls == [(1, "car")]
    with pytest.raises(ValueError, match="needs Detection.color or a color_of"):
        score(COLOR, [det("car", 0, 0, 5, 5)])


def test_position_rule_with_relative_threshold():
    cat = det("cat", 50, 0, 60, 10)
    assert score(POSITION, [cat, det("dog", 0, 0, 10, 10)])[0] == 1.0
    assert score(POSITION, [cat, det("dog", 80, 0, 90, 10)])[0] == 0.0
    # Centres 10 px apart, sizes 10 + 10: the 0.1 * 20 = 2 px shrink leaves dx = -8/10 -> left of.
    assert relative_position((0, 0, 10, 10), (10, 0, 20, 10)) == {"left of"}
    # Centres 1 px apart: shrunk to nothing -> no relation.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # A diagonal offset (10, 10): shrunk to (8, 8) over length 14.1 -> 0.57 each way: below and right.
    assert relative_position((10, 10, 20, 20), (0, 0, 10, 10)) == {"right of", "below"}
    # y grows downwards: a smaller y is "above".
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    # No target: the position is unchecked and fails; partial 2 of 3 (dog count, cat missing...).
    s, d = score(POSITION, [det("dog", 0, 0, 10, 10)], partial=True)
    assert s == pytest.approx(1 / 3) and "no target for dog to be left of" in d["reasons"]


def test_color_attribution_binds_colours_to_classes():
    good = [det("car", 0, 0, 5, 5, color="red"), det("bus", 9, 0, 14, 5, color="blue")]
    swapped = [det("car", 0, 0, 5, 5, color="blue"), det("bus", 9, 0, 14, 5, color="red")]
    assert score(ATTR, good)[0] == 1.0
    assert score(ATTR, swapped)[0] == 0.0
    assert score(ATTR, swapped, partial=True)[0] == 0.5  # both counts hold, neither colour


def test_select_detections_sorts_caps_and_nms():
    dets = [det("dog", 0, 0, 10, 10, 0.5), det("dog", 1, 1, 11, 11, 0.9), det("dog", 40, 40, 50, 50, 0.7)]
    kept = select_detections(dets, "single_object")
    assert [d.score for d in kept["dog"]] == [0.9, 0.7, 0.5]
    assert len(select_detections(dets, "single_object", max_objects=2)["dog"]) == 2
    assert [d.score for d in select_detections(dets, "single_object", nms_threshold=0.5)["dog"]] == [0.9, 0.7]


def test_parse_metadata_round_trip_and_errors():
    spec = parse_metadata(POSITION)
    assert spec.include[1].position == ("left of", 0)
    assert spec.to_metadata() == POSITION
    assert parse_metadata(COUNT3).to_metadata() == COUNT3
    with pytest.raises(UserError, match=r"include\[0\].position must be \[relation, index of an earlier"):
        parse_metadata({"tag": "position", "include": [{"class": "a", "count": 1, "position": ["left of", 0]}]})
    with pytest.raises(UserError, match=r"include\[0\].count must be an integer >= 1"):
        parse_metadata({"tag": "counting", "include": [{"class": "a", "count": 0}]})
    with pytest.raises(UserError, match="with 'tag' and 'include'"):
        parse_metadata({"prompt": "x"})
