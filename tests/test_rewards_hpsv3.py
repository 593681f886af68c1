"""``hpsv3``: the published HPSv3.safetensors layout (tiny random weights written in it), checked against
transformers' own loading of the same file, HPSv3's instruction text, and both key layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rewards_fixtures import PROMPTS, make_images, single_thread  # noqa: F401

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.hpsv3 import INSTRUCTION, REWARD_SUFFIX, HPSv3, checkpoint_key, hpsv3_head


@pytest.fixture(scope="module")
def options(tmp_path_factory) -> dict:
    from diffalign.rewards.tiny import tiny_reward_options

    return tiny_reward_options("hpsv3", cache_dir=tmp_path_factory.mktemp("tiny-hpsv3"))


@pytest.fixture(scope="module")
def reward(options):
    return load_reward("hpsv3", **options)


@pytest.mark.parametrize("published, ours", [
    ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),  # transformers < 4.52
    ("model.layers.27.mlp.down_proj.weight", "model.language_model.layers.27.mlp.down_proj.weight"),
    ("model.norm.weight", "model.language_model.norm.weight"),
    ("visual.blocks.31.attn.qkv.weight", "model.visual.blocks.31.attn.qkv.weight"),
    ("visual.merger.mlp.2.bias", "model.visual.merger.mlp.2.bias"),
    ("model.language_model.layers.0.self_attn.q_proj.bias", "model.language_model.layers.0.self_attn.q_proj.bias"),
    ("model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.weight"),  # transformers >= 4.52
    ("rm_head.0.weight", "head.0.weight"),
    ("rm_head.5.bias", "head.5.bias"),
    ("lm_head.weight", None),
])
def test_checkpoint_keys_of_both_layouts(published, ours):
    assert checkpoint_key(published) == ours


def test_instruction_is_hpsv3s_verbatim_with_one_reward_token(reward):
    text = HPSv3.messages("a cat on a sofa")[0]["content"][1]["text"]
    assert text.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality and Text "
                           "Alignment and give a overall score to estimate the human preference.")
    assert "and 10 being the best. \n\n**Visual Quality:**  \nEvaluate" in text  # trailing spaces kept
    assert text.endswith("Textual prompt - a cat on a sofa\n\n\n\nPlease provide the overall ratings of this image: "
                         "<|Reward|>\n\nEND\n")
    assert text == INSTRUCTION.format(text_prompt="a cat on a sofa") + REWARD_SUFFIX
    inputs = reward.processor(text=[reward.processor.apply_chat_template(HPSv3.messages("a cat"), tokenize=False,
                                                                          add_generation_prompt=True)],
                              images=[torch.rand(3, 56, 56)], do_rescale=False, return_tensors="pt")
    assert int((inputs["input_ids"] == reward.reward_token_id).sum()) == 1


def test_score_is_mu_of_the_head_at_the_reward_token_as_transformers_loads_the_file(reward, options, tmp_path):
    """transformers reads the same safetensors as a Qwen2VLForConditionalGeneration (its own legacy key
    renames); its hidden state at <|Reward|>, with sequential positions, through rm_head, gives mu."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    state = load_file(options["checkpoint"])
    config = AutoConfig.from_pretrained(options["base"])
    config.text_config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    config.save_pretrained(tmp_path)
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, tmp_path / "model.safetensors")
    stock = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    head = hpsv3_head(config.text_config.hidden_size).eval()
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")})

    images, prompts = make_images(2), PROMPTS[:2]
    expected = []
    for image, prompt in zip(images, prompts):
        text = reward.processor.apply_chat_template(HPSv3.messages(prompt), tokenize=False, add_generation_prompt=True)
        inputs = reward.processor(text=[text], images=[image], do_rescale=False, return_tensors="pt",
                                  size=reward.image_size)
        length = inputs["input_ids"].shape[1]
        with torch.no_grad():
            hidden = stock.model(**inputs, position_ids=torch.arange(length).view(1, 1, -1).expand(3, 1, -1)).last_hidden_state
            expected.append(head(hidden[inputs["input_ids"] == reward.reward_token_id])[0, 0])
    torch.testing.assert_close(reward(images, prompts), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_batched_equals_one_by_one_and_the_image_matters(reward):
    images = make_images(3)
    batched = reward(images, PROMPTS[:3])
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)
    assert (reward(images[:1], ["a cat"]) - reward(images[1:2] * 0.2, ["a cat"])).abs() > 1e-3


def test_the_newer_key_layout_loads_to_the_same_scores(reward, options, tmp_path):
    from safetensors.torch import load_file, save_file

    renamed = {}
    for key, value in load_file(options["checkpoint"]).items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        renamed[key] = value
    save_file(renamed, tmp_path / "HPSv3.safetensors")
    newer = load_reward("hpsv3", **{**options, "checkpoint": str(tmp_path / "HPSv3.safetensors")})
    images = make_images(2)
    torch.testing.assert_close(newer(images, PROMPTS[:2]), reward(images, PROMPTS[:2]))


def test_one_line_errors_for_missing_or_mismatched_weights(options, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        load_reward("hpsv3")
    assert str(error.value) == ("reward 'hpsv3': cannot load 'MizzenAI/HPSv3/HPSv3.safetensors' (no network/hub "
                                "access?); download it and set checkpoint=/path/to/HPSv3.safetensors")
    with pytest.raises(UserError, match="cannot load 'Qwen/Qwen2-VL-7B-Instruct'.*set base=/path/to/Qwen2-VL-7B-Instruct"):
        load_reward("hpsv3", checkpoint=options["checkpoint"])
    from safetensors.torch import load_file, save_file

    state = load_file(options["checkpoint"])
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1].contiguous()  # no <|Reward|> row
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(UserError, match="<\\|Reward\\|> is token .* but the checkpoint embeds"):
        load_reward("hpsv3", **{**options, "checkpoint": str(tmp_path / "short.safetensors")})
    del state["rm_head.5.weight"]
    state["model.embed_tokens.weight"] = load_file(options["checkpoint"])["model.embed_tokens.weight"]
    save_file(state, tmp_path / "headless.safetensors")
    with pytest.raises(UserError, match="does not fit base=.*missing \\['head.5.weight'\\]"):
        load_reward("hpsv3", **{**options, "checkpoint": str(tmp_path / "headless.safetensors")})
