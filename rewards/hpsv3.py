"""``hpsv3``: Human Preference Score v3 (Ma et al. 2025, arXiv 2508.03789; reference MizzenAI/HPSv3,
``hpsv3/inference.py``, ``hpsv3/model/qwen2vl_trainer.py``, ``hpsv3/dataset/data_collator_qwen.py``).

    hpsv3(image, prompt) = mu,  where (mu, sigma) = rm_head(Qwen2-VL hidden state at the <|Reward|> token)

Qwen2-VL-7B-Instruct reads the image (resized to 256 x 28 x 28 pixels, as HPSv3 trains and scores) and
HPSv3's instruction with the prompt, ending in ``<|Reward|>``, a token HPSv3 adds to the tokenizer; a
float32 MLP head (hidden -> 1024 -> 16 -> 2, ReLU) maps that token's last hidden state to the mean and
uncertainty of the preference score; the reward is the mean (about -5 .. 15 on real images).

As in HPSv3's model, the language model runs with plain sequential positions (the reward model calls
the text model without the 3D multimodal rope positions), right padding.

Weights: the published ``HPSv3.safetensors`` (the whole reward model's state dict, its embeddings
resized for the added token), read onto the device tensor by tensor into a model built on the meta
device; config, tokenizer and processor come from the base model (``Qwen/Qwen2-VL-7B-Instruct``). Both
key layouts load: transformers < 4.52 (``model.layers.*``, ``visual.*``) and later
(``model.language_model.*``, ``model.visual.*``). Not differentiable (the processor works in PIL/numpy).
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.errors import UserError

from .base import Reward, to_device_async
from .registry import register_reward
from .vlm import chat_inputs
from .weights import freeze, load_state_dict_file, missing_weights_error, resolve_device, resolve_dtype, resolve_hub_file

DEFAULT_CHECKPOINT = "MizzenAI/HPSv3/HPSv3.safetensors"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28  # HPSv3_7B.yaml min_pixels = max_pixels

# HPSv3's instruction, verbatim (data_collator_qwen.py INSTRUCTION + prompt_with_special_token); the
# model was trained on exactly this text, whitespace included.
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n\n\n"
)
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_head(hidden_size: int, output_dim: int = 2) -> torch.nn.Sequential:
    """HPSv3's ``ranknet`` head (``rm_head.{0,3,5}``): Linear-ReLU-Dropout-Linear-ReLU-Linear."""
    return torch.nn.Sequential(torch.nn.Linear(hidden_size, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, output_dim))


def checkpoint_key(key: str) -> str | None:
    """A published key -> ``model.<Qwen2VLModel key>`` or ``head.<rm_head key>``; None for ``lm_head`` (unused)."""
    if key.startswith("rm_head."):
        return "head." + key[len("rm_head."):]
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                     ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(old):
            return "model." + new + key[len(old):]
    raise UserError(f"reward 'hpsv3': unexpected key '{key}' in the checkpoint (not a Qwen2-VL reward model)")


class HPSv3(Reward):
    """Qwen2-VL + HPSv3's head, read at the ``<|Reward|>`` token; see the module docstring."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module, processor: Any, reward_token_id: int, *,
                 pixels: int, batch_size: int, bt_scale: float) -> None:
        super().__init__("hpsv3", differentiable=False, batch_size=batch_size, bt_scale=bt_scale)
        self.model = model
        self.head = head  # float32, as HPSv3 keeps it
        self.processor = processor
        self.processor.tokenizer.padding_side = "right"  # as HPSv3's processor
        self.reward_token_id = reward_token_id
        self.image_size = {"shortest_edge": pixels, "longest_edge": pixels}

    @staticmethod
    def messages(prompt: str) -> list[dict[str, Any]]:
        """One user turn: the image, then HPSv3's instruction and the reward-token suffix."""
        text = INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        inputs = chat_inputs(self.processor, [self.messages(p) for p in prompts],
                             list(images.detach().float().cpu()), self.image_size)
        inputs = {key: to_device_async(value, self.device) for key, value in inputs.items()}
        input_ids = inputs["input_ids"]
        found = (input_ids == self.reward_token_id).sum(1)
        if not (found == 1).all():
            raise RuntimeError(f"reward 'hpsv3': expected one {REWARD_TOKEN} token per prompt, found {found.tolist()}")
        batch, length = input_ids.shape
        positions = torch.arange(length, device=self.device).view(1, 1, length).expand(3, batch, length)
        hidden = self.model(input_ids=input_ids, attention_mask=inputs["attention_mask"], position_ids=positions,
                            pixel_values=inputs["pixel_values"].to(self.model.dtype),
                            image_grid_thw=inputs["image_grid_thw"]).last_hidden_state
        at_token = hidden[input_ids == self.reward_token_id]  # [b, D], row order kept
        return self.head(at_token.float())[:, 0]  # mu; [:, 1] is the uncertainty


@register_reward("hpsv3", differentiable=False, weights="download: MizzenAI/HPSv3 + Qwen/Qwen2-VL-7B-Instruct")
def build_hpsv3(checkpoint: str = DEFAULT_CHECKPOINT, base: str = DEFAULT_BASE, pixels: int = IMAGE_PIXELS,
                batch_size: int = 4, device: str = "cpu", dtype: str = "auto", bt_scale: float = 1.0) -> Reward:
    """HPSv3. ``checkpoint``: ``HPSv3.safetensors``, a local path or ``org/repo/filename``; ``base``: hub id
    or local directory of Qwen2-VL-7B-Instruct (config, tokenizer, processor); ``pixels``: image area."""
    from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

    device = resolve_device(device, "hpsv3")
    torch_dtype = resolve_dtype(dtype, device, "hpsv3")
    path = resolve_hub_file(checkpoint, "hpsv3", "checkpoint")
    try:
        config = AutoConfig.from_pretrained(base)
        processor = AutoProcessor.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise missing_weights_error("hpsv3", base, "base", "/path/to/Qwen2-VL-7B-Instruct", error) from error
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as HPSv3 does
    reward_token_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)

    state: dict[str, torch.Tensor] = {}
    for key, value in load_state_dict_file(path, "hpsv3", "checkpoint", device=device).items():
        new_key = checkpoint_key(key)
        if new_key is not None:
            state[new_key] = value.to(torch.float32 if new_key.startswith("head.") else torch_dtype)
    if "model.language_model.embed_tokens.weight" not in state:
        raise UserError(f"reward 'hpsv3': checkpoint='{path}' has no language model embeddings; is it HPSv3.safetensors?")
    config.text_config.vocab_size = state["model.language_model.embed_tokens.weight"].shape[0]
    if reward_token_id >= config.text_config.vocab_size:
        raise UserError(f"reward 'hpsv3': {REWARD_TOKEN} is token {reward_token_id} of base='{base}', but the checkpoint "
                        f"embeds {config.text_config.vocab_size}; base must be the tokenizer HPSv3 was trained with")
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        model = Qwen2VLModel(config)
        head = hpsv3_head(config.text_config.hidden_size)
    wrapper = torch.nn.ModuleDict({"model": model, "head": head})
    wanted = set(wrapper.state_dict())
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise UserError(f"reward 'hpsv3': checkpoint='{path}' does not fit base='{base}' "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrapper.load_state_dict(state, assign=True)
    del state
    with torch.device(device):  # the rotary tables are buffers, not weights: build them where the model is
        model.visual.rotary_pos_emb = type(model.visual.rotary_pos_emb)(model.visual.rotary_pos_emb.config)
        model.language_model.rotary_emb = type(model.language_model.rotary_emb)(config=model.language_model.rotary_emb.config)
    reward = HPSv3(freeze(model), freeze(head), processor, reward_token_id, pixels=int(pixels),
                   batch_size=batch_size, bt_scale=bt_scale)
    return reward.to(device)  # the weights are already there; this moves the reward's empty device anchor
