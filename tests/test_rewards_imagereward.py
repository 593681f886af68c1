"""``imagereward``: the published ``ImageReward.pt`` layout mapped onto transformers' BLIP classes, the
reference preprocessing and the score normalisation (tiny random weights written in that layout)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from rewards_fixtures import PROMPTS, make_images, single_thread, tiny_options  # noqa: F401

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.imagereward import SCORE_STD, blip_key_to_transformers, transformers_key_to_blip


@pytest.fixture(scope="module")
def reward(tiny_options):
    return load_reward("imagereward", **tiny_options["imagereward"])


@pytest.mark.parametrize("published, ours", [
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.weight", "vision.embeddings.patch_embedding.weight"),
    ("blip.visual_encoder.blocks.23.attn.qkv.weight", "vision.encoder.layers.23.self_attn.qkv.weight"),
    ("blip.visual_encoder.blocks.0.attn.proj.bias", "vision.encoder.layers.0.self_attn.projection.bias"),
    ("blip.visual_encoder.blocks.7.norm2.weight", "vision.encoder.layers.7.layer_norm2.weight"),
    ("blip.visual_encoder.blocks.7.mlp.fc1.weight", "vision.encoder.layers.7.mlp.fc1.weight"),
    ("blip.visual_encoder.norm.bias", "vision.post_layernorm.bias"),
    ("blip.text_encoder.embeddings.word_embeddings.weight", "text.embeddings.word_embeddings.weight"),
    ("blip.text_encoder.encoder.layer.11.crossattention.self.key.weight",
     "text.encoder.layer.11.crossattention.self.key.weight"),
    ("mlp.layers.0.weight", "mlp.0.weight"),
    ("mlp.layers.7.bias", "mlp.7.bias"),
])
def test_published_keys_map_onto_transformers_blip_and_back(published, ours):
    assert blip_key_to_transformers(published) == ours
    assert transformers_key_to_blip(ours) == published


def test_keys_not_used_for_scoring_are_dropped():
    for key in ("blip.vision_proj.weight", "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"):
        assert blip_key_to_transformers(key) is None


def test_checkpoint_is_a_plain_state_dict_in_the_published_layout(tiny_options):
    state = torch.load(tiny_options["imagereward"]["checkpoint"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {k.split(".")[0] for k in state} == {"blip", "mlp"}
    assert sorted({k for k in state if k.startswith("mlp.")}) == [
        f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]


def test_score_normalisation_shift_of_the_last_bias(reward, tiny_options, tmp_path):
    """score = (mlp(x) - mean) / std, so adding d to the last layer's bias adds exactly d / std."""
    state = torch.load(tiny_options["imagereward"]["checkpoint"], weights_only=True)
    state["mlp.layers.7.bias"] = state["mlp.layers.7.bias"] + 0.5
    torch.save(state, tmp_path / "ImageReward.pt")
    shifted = load_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"),
                          tokenizer=tiny_options["imagereward"]["tokenizer"])
    images = make_images(3)
    torch.testing.assert_close(shifted(images, PROMPTS[:3]) - reward(images, PROMPTS[:3]),
                               torch.full((3,), 0.5 / SCORE_STD), atol=1e-5, rtol=0)


def test_the_image_and_the_prompt_both_move_the_score(reward):
    images = make_images(2)
    assert (reward(images, ["a cat", "a cat"])[0] - reward(images, ["a cat", "a cat"])[1]).abs() > 1e-3
    assert (reward(images[:1], ["a cat"]) - reward(images[:1], ["two dogs running on a beach at sunset"])).abs() > 1e-3


def test_preprocessing_matches_the_reference_torchvision_transform(reward):
    """ImageReward's transform: Resize(n, bicubic) on the PIL image, CenterCrop(n), ToTensor, CLIP Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    n = reward.image_size
    transform = Compose([Resize(n, interpolation=InterpolationMode.BICUBIC), CenterCrop(n), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    for size, exact in [((n, n), True), ((50, 37), False), ((64, 80), False)]:
        arrays = (make_images(2, *size) * 255).round().to(torch.uint8)
        images = arrays.float() / 255
        expected = torch.stack([transform(Image.fromarray(a.permute(1, 2, 0).numpy())) for a in arrays])
        diff = (reward.pixel_values(images) - expected).abs()
        assert diff.max() < 1e-5 if exact else diff.mean() < 0.02, (size, diff.mean())


def test_prompts_are_padded_to_35_tokens_as_published(reward):
    tokens = reward.tokenizer(["a cat"], padding="max_length", truncation=True, max_length=35)
    assert len(tokens["input_ids"][0]) == 35


def test_missing_checkpoint_and_a_foreign_checkpoint_are_one_line_errors(tiny_options, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        load_reward("imagereward")
    assert str(error.value) == ("reward 'imagereward': cannot load 'THUDM/ImageReward/ImageReward.pt' "
                                "(no network/hub access?); download it and set checkpoint=/path/to/ImageReward.pt")
    torch.save({"visual.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not an ImageReward checkpoint"):
        load_reward("imagereward", checkpoint=str(tmp_path / "other.pt"), tokenizer=tiny_options["imagereward"]["tokenizer"])


def test_tiny_builder_is_deterministic(tmp_path):
    from diffalign.rewards.tiny import save_tiny_imagereward

    first = torch.load(save_tiny_imagereward(tmp_path / "a") / "ImageReward.pt", weights_only=True)
    second = torch.load(save_tiny_imagereward(tmp_path / "b") / "ImageReward.pt", weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
