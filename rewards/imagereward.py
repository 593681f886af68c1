"""``imagereward``: ImageReward (Xu et al. 2023, arXiv 2304.05977; reference THUDM/ImageReward, ImageReward.py).

    imagereward(image, prompt) = (MLP(BERT_xattn(tokens(prompt), ViT(image))[CLS]) - 0.16717362830052426)
                                 / 1.0333394966054072                               about -2 .. 2

A BLIP ViT-L/16 (224 px) encodes the image; BLIP's BERT-base text encoder reads the prompt (padded to
35 tokens) with cross-attention to the image tokens; a five-layer linear MLP (768 -> 1024 -> 128 -> 64
-> 16 -> 1, no activations, as published) maps the [CLS] feature to a score, normalised by the mean
and std the authors measured. Preprocessing follows the reference: shortest side to 224 (bicubic),
centre crop, OpenAI CLIP mean/std, here in torch, so the reward is differentiable (ReFL uses it so).

Weights: the published ``ImageReward.pt`` (a plain state dict, read with ``weights_only=True``) in
BLIP's own key layout (``blip.visual_encoder.blocks.N.attn.qkv``, ``blip.text_encoder.encoder.layer.N
...``, ``mlp.layers.{0,2,4,6,7}``), mapped onto transformers' ``BlipVisionModel`` / ``BlipTextModel``
by :func:`blip_key_to_transformers`. The architecture is read off the checkpoint's shapes (heads of
width 64, as in ViT-L and BERT-base). The tokenizer is ``bert-base-uncased`` (ImageReward adds
``[DEC]`` / ``[ENC]``, which only widen the embedding; the prompt's ids are BERT's).
"""

from __future__ import annotations

import re

import torch

from diffalign.errors import UserError

from .base import Reward, to_device_async
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, normalize, resize_shortest_side
from .registry import register_reward
from .weights import freeze, load_state_dict_file, missing_weights_error, resolve_device, resolve_dtype, resolve_hub_file

DEFAULT_CHECKPOINT = "THUDM/ImageReward/ImageReward.pt"
DEFAULT_TOKENIZER = "bert-base-uncased"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
HEAD_DIM = 64
MLP_WIDTHS = (1024, 128, 64, 16, 1)

# BLIP's ViT (timm layout) -> transformers BlipVisionModel; the text encoder's names are the same in both.
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def blip_key_to_transformers(key: str) -> str | None:
    """``ImageReward.pt`` key -> ``vision.<BlipVisionModel key>``, ``text.<BlipTextModel key>``,
    ``mlp.<Sequential key>``; None for keys ImageReward does not score with (projections, ITM head)."""
    if key.startswith("mlp.layers."):
        return "mlp." + key[len("mlp.layers."):]
    if key.startswith("blip.text_encoder."):
        rest = key[len("blip.text_encoder."):]
        return None if rest.startswith("pooler.") or rest.endswith("position_ids") else "text." + rest
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder."):]
        for pattern, replacement in _VISION_RENAMES:
            if re.match(pattern, rest):
                return "vision." + re.sub(pattern, replacement, rest)
        raise UserError(f"reward 'imagereward': unexpected visual encoder key '{key}' in the checkpoint")
    return None


def transformers_key_to_blip(key: str) -> str:
    """The inverse of :func:`blip_key_to_transformers` (used to write checkpoints in the published layout)."""
    part, rest = key.split(".", 1)
    if part == "mlp":
        return "mlp.layers." + rest
    if part == "text":
        return "blip.text_encoder." + rest
    inverse = [(r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
               (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
               (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
               (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
               (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
               (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
               (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"^post_layernorm\.", "norm.")]
    for pattern, replacement in inverse:
        if re.match(pattern, rest):
            return "blip.visual_encoder." + re.sub(pattern, replacement, rest)
    raise ValueError(f"no ImageReward name for {key!r}")


def imagereward_mlp(width: int) -> torch.nn.Sequential:
    """The published head: Linear layers at indices 0, 2, 4, 6, 7 with dropout between (no activations)."""
    widths = (width,) + MLP_WIDTHS
    layers: list[torch.nn.Module] = []
    for index, (inp, out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(inp, out))
        if index < 3:
            layers.append(torch.nn.Dropout((0.2, 0.2, 0.1)[index]))
    return torch.nn.Sequential(*layers)


def blip_configs(state: dict[str, torch.Tensor]):
    """``(BlipVisionConfig, BlipTextConfig)`` read off a mapped state dict's shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    def count(prefix: str) -> int:
        return len({key.split(".")[3] for key in state if key.startswith(prefix)})

    patch = state["vision.embeddings.patch_embedding.weight"]
    vision_width, patch_size = patch.shape[0], patch.shape[-1]
    num_patches = state["vision.embeddings.position_embedding"].shape[1] - 1
    vision = BlipVisionConfig(
        hidden_size=vision_width, intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count("vision.encoder.layers."), num_attention_heads=max(1, vision_width // HEAD_DIM),
        image_size=int(round(num_patches**0.5)) * patch_size, patch_size=patch_size, layer_norm_eps=1e-6)
    words = state["text.embeddings.word_embeddings.weight"]
    text = BlipTextConfig(
        vocab_size=words.shape[0], hidden_size=words.shape[1],
        intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=count("text.encoder.layer."), num_attention_heads=max(1, words.shape[1] // HEAD_DIM),
        max_position_embeddings=state["text.embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=vision_width, layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=None, sep_token_id=None)
    return vision, text


class ImageReward(Reward):
    """BLIP image-text encoder + MLP head, normalised; see the module docstring."""

    def __init__(self, vision: torch.nn.Module, text: torch.nn.Module, mlp: torch.nn.Module, tokenizer, *,
                 image_size: int, batch_size: int, bt_scale: float, dtype: torch.dtype) -> None:
        super().__init__("imagereward", differentiable=True, batch_size=batch_size, bt_scale=bt_scale)
        self.model = torch.nn.ModuleDict({"vision": vision, "text": text})
        self.mlp = mlp  # float32 always, as the reference scores in float
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.dtype = dtype

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] -> [b, 3, 224, 224]: Resize(224, bicubic), CenterCrop(224), CLIP mean/std."""
        resized = resize_shortest_side(images.float(), self.image_size, "bicubic")
        cropped = center_crop(resized, (self.image_size, self.image_size))  # torchvision's rounding
        return normalize(cropped, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.dtype)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        image_embeds = self.model["vision"](pixel_values=self.pixel_values(images)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        text = self.model["text"](input_ids=to_device_async(tokens["input_ids"], images.device),
                                  attention_mask=to_device_async(tokens["attention_mask"], images.device),
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        raw = self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (raw - SCORE_MEAN) / SCORE_STD


@register_reward("imagereward", differentiable=True, weights="download: THUDM/ImageReward + bert-base-uncased")
def build_imagereward(checkpoint: str = DEFAULT_CHECKPOINT, tokenizer: str = DEFAULT_TOKENIZER, batch_size: int = 16,
                      device: str = "cpu", dtype: str = "float32", bt_scale: float = 1.0) -> Reward:
    """ImageReward v1.0. ``checkpoint``: ``ImageReward.pt``, a local path or ``org/repo/filename``;
    ``tokenizer``: hub id or local directory of the BERT tokenizer (``bert-base-uncased``)."""
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    device = resolve_device(device, "imagereward")
    torch_dtype = resolve_dtype(dtype, device, "imagereward")
    path = resolve_hub_file(checkpoint, "imagereward", "checkpoint")
    state = {}
    for key, value in load_state_dict_file(path, "imagereward", "checkpoint", device=device).items():
        new_key = blip_key_to_transformers(key)
        if new_key is not None:
            state[new_key] = value
    try:
        vision_config, text_config = blip_configs(state)
    except KeyError as error:
        raise UserError(f"reward 'imagereward': checkpoint='{path}' is not an ImageReward checkpoint "
                        f"(no {error.args[0]!r} after mapping BLIP's keys)") from error
    try:
        bert_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as error:
        raise missing_weights_error("imagereward", tokenizer, "tokenizer", "/path/to/bert-base-uncased", error) from error
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        vision = BlipVisionModel(vision_config)
        text = BlipTextModel(text_config, add_pooling_layer=False)
        mlp = imagereward_mlp(text_config.hidden_size)
    for name, module in (("vision", vision), ("text", text), ("mlp", mlp)):
        part = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}
        wanted = {key for key in module.state_dict() if not key.endswith("position_ids")}
        missing, unexpected = sorted(wanted - set(part)), sorted(set(part) - wanted)
        if missing or unexpected:
            raise UserError(f"reward 'imagereward': checkpoint='{path}' does not fit ImageReward's {name} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        dtype_of_part = torch.float32 if name == "mlp" else torch_dtype
        module.load_state_dict({key: value.to(dtype_of_part) for key, value in part.items()}, strict=False, assign=True)
    del state
    _fill_position_ids(text, device)
    reward = ImageReward(freeze(vision), freeze(text), freeze(mlp), bert_tokenizer, image_size=vision_config.image_size,
                         batch_size=batch_size, bt_scale=bt_scale, dtype=torch_dtype)
    return reward.to(device)  # the weights are already there; this moves the reward's empty device anchor


def _fill_position_ids(text: torch.nn.Module, device: torch.device) -> None:
    """The text embeddings' ``position_ids`` buffer is not in the checkpoint: make it (0..max-1) on the device."""
    embeddings = text.embeddings
    length = embeddings.position_embeddings.weight.shape[0]
    embeddings.register_buffer("position_ids", torch.arange(length, device=device).expand((1, -1)), persistent=False)
