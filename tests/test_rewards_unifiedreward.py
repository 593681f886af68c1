"""``unifiedreward``: the vlm judge with UnifiedReward's published templates and answer parsing, on the tiny
Qwen2.5-VL (whose random answers are off-format, which exercises the counting path), and the parsers on
answers in UnifiedReward's output format."""

from __future__ import annotations

import logging

import pytest
import torch
from rewards_fixtures import single_thread  # noqa: F401

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.vlm import (UNIFIEDREWARD_PAIRWISE, UNIFIEDREWARD_POINTWISE, both_orders,
                                   parse_unifiedreward_choice, parse_unifiedreward_score)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> str:
    from diffalign.rewards.tiny import tiny_reward_options

    return tiny_reward_options("vlm", cache_dir=tmp_path_factory.mktemp("tiny-vlm"))["model"]


@pytest.fixture
def judge(vlm_dir):
    return load_reward("unifiedreward", model=vlm_dir, max_new_tokens=4, max_off_format=1.0)


@pytest.mark.parametrize("answer, expected", [
    ("Image 1 is better.", 1.0),
    ("Image 2 is better.", 0.0),
    ("Both images are equally good.", 0.5),
    ("Considering alignment and quality, Image 1 is better than Image 2.", 1.0),
    ("image 2 is better", 0.0),
    ("Image 1 is better. On second thought, Image 2 is better.", None),  # two conclusions
    ("The first image.", None),
    ("", None),
])
def test_pairwise_answers(answer, expected):
    assert parse_unifiedreward_choice(answer) == expected


@pytest.mark.parametrize("answer, expected", [
    ("cat (object): 1\nsofa (object): 1\nsleeping (attribute): 0\nFinal Score: 4", 0.75),  # (4 - 1) / 4
    ("red (color): 1\napple (object): 1\nFinal Score: 3.5", 0.625),
    ("**Final Score:** 5", 1.0),
    ("Final Score: 2\nOn reflection, Final Score: 1", 0.0),  # the last one counts
    ("Final Score: 9", 1.0),  # clamped to the 1-5 scale
    ("The image scores 4 out of 5.", None),
])
def test_pointwise_answers(answer, expected):
    assert parse_unifiedreward_score(answer) == expected


def test_both_orders_average_the_verdicts():
    """(a,b) says first wins, (b,a) says second wins: a wins in both, P = 1; a tie and a win: 0.75."""
    values = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0]
    assert both_orders(values).tolist() == [1.0, 0.75, 0.0]


def test_published_templates_reach_the_chat(judge):
    pairwise = judge.pairwise_messages("a red apple")
    assert [part["type"] for part in pairwise[0]["content"]] == ["image", "image", "text"]
    text = pairwise[0]["content"][2]["text"]
    assert text == UNIFIEDREWARD_PAIRWISE.format(prompt="a red apple")
    assert text.startswith("You are given a text caption and two generated images based on that caption.")
    assert text.endswith('"Image 1 is better.", "Image 2 is better." and "Both images are equally good."\n'
                         "Your task is provided as follows:\nText Caption: [a red apple]")
    pointwise = judge.pointwise_messages("a cat")[0]["content"]
    assert [part["type"] for part in pointwise] == ["image", "text"]
    assert pointwise[1]["text"] == UNIFIEDREWARD_POINTWISE.format(prompt="a cat")
    assert "assign a score from 1 to 5 after 'Final Score:'" in pointwise[1]["text"]
    chat = judge.processor.apply_chat_template(pairwise, add_generation_prompt=True, tokenize=False)
    assert chat.count("<|image_pad|>") == 2 and chat.index("<|image_pad|>") < chat.index("Text Caption: [a red apple]")


def test_off_format_answers_count_as_half_and_are_counted(judge, caplog):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="diffalign.rewards.vlm"):
        scores = judge(images, ["a cat", "a dog", "a car"])
    assert scores.tolist() == [0.5, 0.5, 0.5] and (judge.answers, judge.off_format) == (3, 3)
    assert "3 of 3 pointwise answers were off-format (counted as 0.5)" in caplog.text
    p = judge.compare(images, images.flip(0), ["a cat", "a dog", "a car"])
    assert p.tolist() == [0.5, 0.5, 0.5] and (judge.answers, judge.off_format) == (9, 9)  # both orders asked


def test_too_many_off_format_answers_stop_with_one_line(vlm_dir):
    strict = load_reward("unifiedreward", model=vlm_dir, max_new_tokens=2)
    with pytest.raises(UserError) as error:
        strict(torch.rand(1, 3, 32, 32), ["a cat"])
    assert str(error.value).startswith("reward 'unifiedreward': 1 of 1 pointwise answers were off-format")
    assert str(error.value).endswith("above max_off_format=0.5: is model a UnifiedReward checkpoint "
                                     "(e.g. CodeGoat24/UnifiedReward-qwen-7b)?")


def test_bad_options_and_missing_weights(vlm_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="max_off_format must be in \\[0, 1\\]"):
        load_reward("unifiedreward", model=vlm_dir, max_off_format=2)
    with pytest.raises(UserError, match="pairwise_question must contain \\{prompt\\}"):
        load_reward("unifiedreward", model=vlm_dir, pairwise_question="Which is better?")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        load_reward("unifiedreward")
    assert str(error.value) == ("reward 'unifiedreward': cannot load 'CodeGoat24/UnifiedReward-qwen-7b' "
                                "(no network/hub access?); download it and set model=/path/to/dir")
