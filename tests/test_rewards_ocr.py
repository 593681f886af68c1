"""The ``ocr`` reward: Flow-GRPO's edit-distance rule on text that the real PP-OCRv4 models read.

Images are real rendered text (PIL's built-in font), read by the ONNX models the rapidocr wheel ships.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.ocr import ocr_similarity, ocr_target


def render(text: str, size: tuple[int, int] = (160, 64)) -> torch.Tensor:
    """Black text on white, [3, H, W] in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((8, 16), text, fill="black", font=ImageFont.load_default(size=24))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr():
    return load_reward("ocr", threads=1)


def test_rendered_hello_world_scores_high_for_its_prompt_and_low_for_another(ocr):
    """The image shows "hello world"; recognised and normalised: "helloworld".
    - "hello world" (any case, any spaces) is contained: 1.
    - "hello word" -> "helloword" (9 chars), one deletion away and not contained: 1 - 1/9.
    - "xyz": distance >= 10 - 3 = 7, capped at len("xyz") = 3: 1 - 3/3 = 0.
    """
    image = render("hello world")
    prompts = ['a sign that says "hello world"', 'a neon sign, "HELLO  World", at night',
               'a sign that says "hello word"', 'a sign that says "xyz"']
    scores = ocr(image.expand(4, -1, -1, -1), prompts)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 1 - 1 / 9, 0.0]))
    assert ocr.recognise((image.permute(1, 2, 0) * 255).round().byte().numpy()) == "hello world"


def test_a_blank_image_reads_nothing_and_scores_zero(ocr):
    assert ocr(torch.ones(1, 3, 64, 160), ['"hello"']).tolist() == [0.0]


def test_similarity_rule_by_hand():
    assert ocr_similarity("Hello World!", "hello world") == 1.0  # contained after normalising
    assert ocr_similarity("helo", "hello") == pytest.approx(1 - 1 / 5)  # one insertion
    assert ocr_similarity("abcdefghijkl", "xy") == 0.0  # distance capped at the target length
    assert ocr_target('a cat holding a sign "Free hugs", photo') == "Free hugs"
    assert ocr_target('"a" then "b"') == "a"


@pytest.mark.parametrize("prompt", ["a sign with no quotes", 'an empty sign ""', 'only one " quote'])
def test_a_prompt_without_quoted_text_is_a_one_line_error(ocr, prompt):
    with pytest.raises(UserError, match="has no text in double quotes to render"):
        ocr(torch.ones(1, 3, 32, 32), [prompt])


def test_the_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if the package were not installed
    with pytest.raises(UserError) as error:
        load_reward("ocr")
    assert str(error.value) == ("reward 'ocr' needs the ocr extra (rapidocr_onnxruntime is missing); "
                                "pip install 'diffalign[ocr]' (rapidocr-onnxruntime, rapidfuzz)")


def test_asking_for_a_gradient_is_a_user_error(ocr):
    assert ocr.differentiable is False
    with pytest.raises(UserError, match="not differentiable"):
        ocr(render("hi")[None].requires_grad_(), ['"hi"'])


def test_opencv_without_its_system_library_is_named(monkeypatch):
    """rapidocr imports OpenCV, which needs libGL.so.1: a machine without it gets the apt package to install."""
    import importlib.abc

    class NoLibGL(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rapidocr_onnxruntime":
                raise ImportError("libGL.so.1: cannot open shared object file: No such file or directory")
            return None

    monkeypatch.delitem(sys.modules, "rapidocr_onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoLibGL(), *sys.meta_path])
    with pytest.raises(UserError) as error:
        load_reward("ocr")
    assert str(error.value) == ("reward 'ocr': OpenCV, which rapidocr uses, cannot load a system library "
                                "(libGL.so.1: cannot open shared object file: No such file or directory); install it, "
                                "e.g. apt-get install libgl1 libglib2.0-0")
