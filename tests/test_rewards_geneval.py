"""``geneval``: the Mask2Former + CLIP detector side, end to end on tiny random weights saved in the real
formats (save_pretrained / open_clip dir), feeding the shared GenEval rule evaluator.

The tiny detector's class head is biased towards "dog" (class 16), so its detections score about 0.49:
above GenEval's 0.3 threshold, below the 0.9 of counting prompts. Rule logic itself is tested in
test_shapes_geneval_rules.py on synthetic detections.
"""

from __future__ import annotations

import json

import pytest
import torch
from rewards_fixtures import single_thread  # noqa: F401

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.geneval import GENEVAL_CLASSES, Detection
from diffalign.rewards.geneval_rules import GENEVAL_COLORS, evaluate, parse_metadata


def meta(tag: str, include: list, exclude: list | None = None, prompt: str = "p") -> dict:
    out = {"tag": tag, "include": include, "prompt": prompt}
    if exclude:
        out["exclude"] = exclude
    return out


DOG = meta("single_object", [{"class": "dog", "count": 1}], prompt="a photo of a dog")
CAT = meta("single_object", [{"class": "cat", "count": 1}], prompt="a photo of a cat")
NO_DOG = meta("single_object", [{"class": "cat", "count": 1}], [{"class": "dog", "count": 1}], prompt="a cat, no dog")
TWO_DOGS = meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}], prompt="a photo of two dogs")


@pytest.fixture(scope="module")
def tiny_options(tmp_path_factory) -> dict:
    from diffalign.rewards.tiny import tiny_reward_options

    return {"geneval": tiny_reward_options("geneval", cache_dir=tmp_path_factory.mktemp("tiny-geneval"))}


@pytest.fixture(scope="module")
def reward(tiny_options):
    return load_reward("geneval", **tiny_options["geneval"])


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 48, 64, generator=torch.Generator().manual_seed(0))


def test_label_mapping_and_scores_match_transformers_post_processing(reward):
    """At 384 x 384 (no resize, no padding) our mmdet-style post-processing and transformers' own give the
    same instances: class id k is GenEval's k-th name, with the same scores and masks."""
    image = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    ours = [d for d in reward.detect(image)[0] if d.mask.any()]
    from diffalign.rewards.image_ops import to_uint8_hwc

    inputs = reward.image_processor(images=to_uint8_hwc(image), return_tensors="pt")
    with torch.no_grad():
        outputs = reward.model(**inputs)
    theirs = reward.image_processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=[(384, 384)], return_binary_maps=True)[0]
    # transformers keeps the top num_queries (query, class) pairs, mmdet (and we) the top 100: theirs are among ours
    assert len(theirs["segments_info"]) == 10 and len(ours) >= 10
    for segment, their_mask in zip(theirs["segments_info"], theirs["segmentation"].bool().numpy()):
        label = GENEVAL_CLASSES[segment["label_id"]]
        assert any(d.label == label and abs(d.score - segment["score"]) < 1e-5 and (d.mask == their_mask).all()
                   for d in ours), segment
    assert ours[0].label == "dog" and GENEVAL_CLASSES[16] == "dog"
    assert GENEVAL_CLASSES[64:67] == ("computer mouse", "tv remote", "computer keyboard") and len(GENEVAL_CLASSES) == 80


def test_detections_are_in_image_pixels_best_first(reward, images):
    found = reward.detect(images)
    assert len(found) == 4 and all(len(dets) == 100 for dets in found)  # 10 queries x 80 classes, top 100
    for dets in found:
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        assert all(d.mask.shape == (48, 64) and d.mask.dtype == bool for d in dets)
        for d in dets[:5]:
            ys, xs = d.mask.nonzero()
            assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # mmdet's mask2bbox
    assert 0.3 < found[0][0].score < 0.9 and found[0][0].label == "dog"


def test_the_rules_get_what_the_detector_found(reward, images):
    """dog found (about 0.49 > 0.3): 1; cat: 0; "no dog": 0; two dogs as a counting prompt needs > 0.9: 0."""
    specs = [DOG, CAT, NO_DOG, TWO_DOGS]
    scores = reward(images, [json.dumps(s) for s in specs])
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0]
    detections = reward.detect(images)
    by_hand = [evaluate(parse_metadata(s), d, color_of=reward.colors_of(img))[0]
               for s, d, img in zip(specs, detections, images)]
    assert scores.tolist() == by_hand
    details = reward.evaluate_images(images[:1], [json.dumps(CAT)])[0][1]
    assert details["reasons"] == ["expected cat>=1, found 0"] and details["counts"] == {"dog": 10}


def test_colour_clauses_use_clip_on_the_detected_objects(reward, images, tiny_options):
    """The colour CLIP picks for the top dog decides: that colour passes, any other fails (partial: 1 of 2)."""
    top = reward.detect(images[:1])[0][:1]
    picked = reward.colors_of(images[0])(top, "dog")[0]
    other = next(c for c in GENEVAL_COLORS if c != picked)
    prompts = [json.dumps(meta("colors", [{"class": "dog", "count": 1, "color": c}])) for c in (picked, other)]
    assert reward(images[:1].expand(2, -1, -1, -1), prompts).tolist() == [1.0, 0.0]
    partial = load_reward("geneval", **tiny_options["geneval"], partial=True)
    assert partial(images[:1].expand(2, -1, -1, -1), prompts).tolist() == [1.0, 0.5]


def test_colour_crop_is_the_mask_over_grey_cropped_to_the_box(reward):
    """A red image, the left half masked in: the crop shows red on the left and GenEval's #999 grey on the right."""
    size = reward.clip_preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    image = torch.zeros(3, size, size)
    image[0] = 1.0
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:, : size // 2] = True
    crop = reward.object_crops(image, [Detection("dog", (0, 0, size, size), 0.5, mask.numpy())])[0]
    mean = torch.tensor(reward.clip_preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(reward.clip_preprocess_cfg["std"]).view(3, 1, 1)
    pixels = crop * std + mean
    torch.testing.assert_close(pixels[:, :, : size // 2], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, size, size // 2))
    torch.testing.assert_close(pixels[:, :, size // 2 :], torch.full((3, size, size // 2), 0x99 / 255))
    classifier = reward.color_classifier("dog")
    assert classifier.shape[1] == 10
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(10))


def test_plain_prompts_are_looked_up_in_the_metadata_file(tmp_path, images, tiny_options):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in (DOG, CAT)) + "\n")
    reward = load_reward("geneval", **tiny_options["geneval"], metadata=str(path))
    assert reward(images[:2], ["a photo of a dog", "a photo of a cat"]).tolist() == [1.0, 0.0]
    with pytest.raises(UserError) as error:
        reward(images[:1], ["a photo of a horse"])
    assert str(error.value) == (
        "reward 'geneval': prompt 'a photo of a horse' has no GenEval metadata (the 2 prompts of metadata); set "
        "metadata=/path/to/evaluation_metadata.jsonl holding it, or pass the metadata line as the prompt")


def test_bad_metadata_files_are_one_line_errors(tmp_path, tiny_options):
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps(DOG) + "\n" + json.dumps({**CAT, "prompt": DOG["prompt"]}) + "\n")
    with pytest.raises(UserError, match="line 2: prompt 'a photo of a dog' appears with two different metadata"):
        load_reward("geneval", **tiny_options["geneval"], metadata=str(clash))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(DOG) + "\n{not json\n")
    with pytest.raises(UserError, match="broken.jsonl line 2 is not JSON"):
        load_reward("geneval", **tiny_options["geneval"], metadata=str(broken))
    with pytest.raises(UserError, match="metadata='/no/such.jsonl' is not a file"):
        load_reward("geneval", **tiny_options["geneval"], metadata="/no/such.jsonl")


def test_missing_detector_names_the_hub_id_and_option(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        load_reward("geneval", detector="facebook/mask2former-swin-small-coco-instance")
    assert str(error.value) == (
        "reward 'geneval': cannot load 'facebook/mask2former-swin-small-coco-instance' (no network/hub access?); "
        "download it and set detector=/path/to/mask2former-swin-small-coco-instance")
