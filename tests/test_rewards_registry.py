"""The registry: names, spec parsing, option checking, require_differentiable, composite."""

from __future__ import annotations

import pytest
import torch
from rewards_fixtures import make_images, single_thread  # noqa: F401

from diffalign.errors import UserError
from diffalign.rewards import (
    Reward,
    is_differentiable_spec,
    list_rewards,
    load_reward,
    parse_reward_spec,
    register_reward,
    require_differentiable,
    spec_uses_prompts,
)
from diffalign.rewards.registry import _REGISTRY, format_reward_spec

BUILTIN = ["aesthetic", "brightness", "clip", "composite", "geneval", "hpsv2", "hpsv3", "imagereward", "jpeg_compressibility",
           "jpeg_incompressibility", "ocr", "openai_judge", "pickscore", "remote", "saturation", "shapes_geneval", "shapes_pref",
           "target_color", "unifiedreward", "vlm"]


def test_every_builtin_reward_is_registered_without_importing_model_libraries():
    import ast
    import subprocess
    import sys

    code = ("import sys; from diffalign.rewards import list_rewards; print(list_rewards()); "
            "print([m for m in ('open_clip', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert set(BUILTIN) <= set(ast.literal_eval(out[0])) and out[1] == "[]"
    assert list_rewards() == sorted(list_rewards())
    assert set(BUILTIN) <= set(list_rewards())


def test_misspelt_name_lists_known_rewards_and_suggests():
    with pytest.raises(UserError) as error:
        load_reward("pickscor")
    message = str(error.value)
    assert message.startswith("unknown reward 'pickscor' (did you mean 'pickscore'?); known rewards: aesthetic, brightness")
    assert "\n" not in message


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("pickscore", ("pickscore", {})),
        ("vlm:model=Qwen/Qwen2.5-VL-7B-Instruct,batch_size=4",
         ("vlm", {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "batch_size": 4})),
        ("target_color:color=[0, 1, 0.5],bt_scale=1e-3", ("target_color", {"color": [0, 1, 0.5], "bt_scale": 0.001})),
        ("clip: model = ViT-B-32 , pretrained=openai", ("clip", {"model": "ViT-B-32", "pretrained": "openai"})),
        ("vlm:trust_remote_code=true,system_prompt=null", ("vlm", {"trust_remote_code": True, "system_prompt": None})),
        ({"clip": {"model": "ViT-B-32"}}, ("clip", {"model": "ViT-B-32"})),
        ({"brightness": None}, ("brightness", {})),
        ({"composite": {"pickscore": 1.0, "aesthetic": 0.1}},
         ("composite", {"weights": {"pickscore": 1.0, "aesthetic": 0.1}})),
        ({"composite": {"weights": {"pickscore": 1.0}, "standardize": "batch", "aesthetic": 0.5}},
         ("composite", {"weights": {"pickscore": 1.0, "aesthetic": 0.5}, "standardize": "batch"})),
        ("composite:brightness=1,saturation=-0.5", ("composite", {"weights": {"brightness": 1, "saturation": -0.5}})),
    ],
)
def test_parse_reward_spec_forms(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("clip:modle=ViT-B-32", "reward 'clip' has no option 'modle' (did you mean 'model'?); its options are: model,"),
        ("clip:model", "reward spec 'clip:model': 'model' is not key=value"),
        ({"clip": {}, "aesthetic": {}}, "must have exactly one key"),
        ({"clip": "ViT-B-32"}, "reward 'clip': options must be a mapping"),
        ({"composite": {"pickscor": 1.0}}, "unknown reward 'pickscor' (did you mean 'pickscore'?)"),
        (":model=x", "has no name"),
        (42, "a reward spec must be a name"),
    ],
)
def test_bad_specs_are_one_line_user_errors(spec, message):
    with pytest.raises(UserError) as error:
        parse_reward_spec(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_format_reward_spec_round_trips():
    for name, options in [("clip", {"model": "ViT-B-32", "scale": 2.5}), ("target_color", {"color": [1.0, 0.0, 0.0]}),
                          ("brightness", {})]:
        assert parse_reward_spec(format_reward_spec(name, options)) == (name, options)


def test_require_differentiable_message_and_specs():
    with pytest.raises(UserError) as error:
        require_differentiable("jpeg_compressibility", "draft.reward")
    assert str(error.value) == (
        "reward 'jpeg_compressibility' is not differentiable; draft.reward needs a differentiable reward "
        "(e.g. aesthetic, brightness, clip, hpsv2, imagereward, pickscore, saturation, shapes_pref, target_color)"
    )
    require_differentiable("brightness", "draft.reward")
    require_differentiable({"composite": {"brightness": 1.0, "saturation": 0.5}}, "draft.reward")
    with pytest.raises(UserError, match="reward 'composite' is not differentiable; adjoint_matching.reward"):
        require_differentiable({"composite": {"brightness": 1.0, "vlm": 0.5}}, "adjoint_matching.reward")
    with pytest.raises(UserError, match="reward 'vlm' is not differentiable"):
        require_differentiable("vlm:model=/some/where", "draft.reward")
    require_differentiable(load_reward("saturation"), "draft.reward")  # built rewards work too


def test_spec_uses_prompts():
    assert not spec_uses_prompts("brightness")
    assert not spec_uses_prompts({"composite": {"aesthetic": 1.0, "jpeg_compressibility": 0.1}})
    assert spec_uses_prompts("pickscore")
    assert spec_uses_prompts({"composite": {"aesthetic": 1.0, "clip": 0.1}})


def test_register_custom_reward_and_load_with_options():
    class Contrast(Reward):
        def __init__(self, gain: float) -> None:
            super().__init__("test_contrast", differentiable=True, batch_size=2, weightless=True)
            self.gain = gain

        def score_batch(self, images, prompts):
            return self.gain * images.std(dim=(1, 2, 3))

    @register_reward("test_contrast", differentiable=True, uses_prompts=False)
    def build_contrast(gain: float = 1.0) -> Reward:
        return Contrast(gain)

    try:
        images = make_images(5)
        reward = load_reward("test_contrast:gain=2.0")
        assert reward.name == "test_contrast"
        torch.testing.assert_close(reward(images, [""] * 5), 2.0 * images.std(dim=(1, 2, 3)))
        assert load_reward({"test_contrast": {"gain": 2.0}}, gain=3.0).gain == 3.0  # keyword options win
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_contrast")(lambda: None)
    finally:
        del _REGISTRY["test_contrast"]


def test_load_reward_passes_built_rewards_through():
    reward = load_reward("brightness")
    assert load_reward(reward) is reward
    with pytest.raises(UserError, match="already built"):
        load_reward(reward, batch_size=2)


# ---------------------------------------------------------------------- composite
def test_composite_is_the_weighted_sum():
    images = make_images(4)
    prompts = [""] * 4
    composite = load_reward({"composite": {"brightness": 1.0, "saturation": -0.5, "target_color:color=[0,0,1]": 2.0}})
    expected = (load_reward("brightness")(images, prompts) - 0.5 * load_reward("saturation")(images, prompts)
                + 2.0 * load_reward("target_color:color=[0,0,1]")(images, prompts))
    torch.testing.assert_close(composite(images, prompts), expected)
    assert composite.differentiable
    assert load_reward("composite", weights={"brightness": 1.0, "jpeg_compressibility": 0.1}).differentiable is False


def test_composite_gradient_and_non_differentiable_parts():
    images = make_images(3, requires_grad=True)
    composite = load_reward({"composite": {"brightness": 2.0, "saturation": 1.0}})
    composite(images, [""] * 3).sum().backward()
    brightness_only = make_images(3, requires_grad=True)
    (2.0 * brightness_only.mean(dim=(1, 2, 3)) + load_reward("saturation")(brightness_only, [""] * 3)).sum().backward()
    torch.testing.assert_close(images.grad, brightness_only.grad)
    mixed = load_reward({"composite": {"brightness": 1.0, "jpeg_compressibility": 0.1}})
    with pytest.raises(UserError, match="reward 'composite' is not differentiable"):
        mixed(make_images(2, requires_grad=True), ["", ""])


def test_composite_batch_standardisation_zero_mean_unit_std():
    images = make_images(6)
    composite = load_reward({"composite": {"weights": {"brightness": 1.0, "saturation": 1.0}, "standardize": "batch"}})
    scores = composite(images, [""] * 6)
    b = load_reward("brightness")(images, [""] * 6)
    s = load_reward("saturation")(images, [""] * 6)
    expected = (b - b.mean()) / (b.std() + 1e-6) + (s - s.mean()) / (s.std() + 1e-6)
    torch.testing.assert_close(scores, expected)
    assert abs(scores.mean().item()) < 1e-5


def test_composite_running_statistics_match_all_seen_scores_and_restore():
    composite = load_reward("composite", weights={"brightness": 1.0}, standardize="running")
    first, second = make_images(3, seed=1), make_images(5, seed=2)
    composite(first, [""] * 3)
    last = composite(second, [""] * 5)
    seen = torch.cat([first, second]).mean(dim=(1, 2, 3)).double()
    stats = composite.statistics()["brightness"]
    assert stats["count"] == 8
    assert stats["mean"] == pytest.approx(seen.mean().item(), abs=1e-6)
    assert stats["m2"] / 7 == pytest.approx(seen.var().item(), abs=1e-6)
    expected = (second.mean(dim=(1, 2, 3)) - seen.mean().float()) / (seen.std().float() + 1e-6)
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=1e-5)
    restored = load_reward("composite", weights={"brightness": 1.0}, standardize="running")
    restored.load_statistics(composite.statistics())
    assert restored.statistics() == composite.statistics()


EMPTY_COMPOSITE = "reward 'composite' needs weights: weights names no reward; list at least one, " \
                  "e.g. {composite: {pickscore: 1.0, aesthetic: 0.1}}"


@pytest.mark.parametrize("spec", ["composite", "composite:standardize=batch", {"composite": None}, {"composite": {}},
                                  {"composite": {"weights": {}, "standardize": "batch"}}, {"composite": {"weights": None}}])
def test_a_composite_with_no_parts_is_rejected_where_it_is_parsed(spec):
    for check in (parse_reward_spec, is_differentiable_spec, spec_uses_prompts, load_reward,
                  lambda s: require_differentiable(s, "draft.reward")):
        with pytest.raises(UserError) as error:
            check(spec)
        assert str(error.value) == EMPTY_COMPOSITE  # not "differentiable", as an empty all() would say
    with pytest.raises(UserError, match="needs weights"):  # nested inside another composite too
        parse_reward_spec({"composite": {"brightness": 1.0, "composite:standardize=batch": 1.0}})
    # Parts given to load_reward as keywords complete a bare spec.
    assert load_reward("composite", weights={"brightness": 1.0}).part_names == ["brightness"]


def test_composite_bad_options():
    with pytest.raises(UserError, match="reward 'composite' needs weights"):
        load_reward("composite")
    with pytest.raises(UserError, match="standardize='zscore'; use one of none, batch, running"):
        load_reward("composite", weights={"brightness": 1.0}, standardize="zscore")
    with pytest.raises(UserError, match="weight of 'brightness' must be a number"):
        load_reward({"composite": {"brightness": "high"}})


def test_diffalign_rewards_lists_each_reward_its_gradient_and_weights(capsys):
    from diffalign.cli import main
    from diffalign.rewards.registry import describe_rewards

    rows = {row["name"]: row for row in describe_rewards()}
    assert list(rows) == list_rewards()
    assert (rows["ocr"]["differentiable"], rows["ocr"]["weights"]) == ("no", "bundled: PP-OCRv4 in rapidocr-onnxruntime (ocr extra)")
    assert (rows["imagereward"]["differentiable"], rows["imagereward"]["weights"]) == (
        "yes", "download: THUDM/ImageReward + bert-base-uncased")
    assert rows["composite"]["differentiable"] == "depends" and rows["brightness"]["weights"] == "none"
    assert all(row["weights"] != "-" for name, row in rows.items() if name in BUILTIN)  # every built-in says
    main(["rewards"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "differentiable", "weights"] and len(lines) == len(rows) + 1
    assert any(line.split()[:3] == ["hpsv3", "no", "download:"] for line in lines)
    main(["rewards", "--names"])
    assert capsys.readouterr().out.split() == list_rewards()
