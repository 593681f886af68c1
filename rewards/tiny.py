"""Tiny random-weight scorers, written in the on-disk format of the real weights.

Each ``save_tiny_*`` writes what a user would download, in the same layout, so that loading it takes
exactly the code path of real weights:

    save_tiny_open_clip(dir)       open_clip hub layout: open_clip_config.json + open_clip_model.safetensors
    save_tiny_hps(dir)             open_clip_config.json + HPS_v2.1_compressed.pt ({"state_dict": ...})
    save_tiny_aesthetic_head(path) the aesthetic MLP state dict (.pth, layers.{0,2,4,6,7})
    save_tiny_pickscore(dir)       HF CLIPModel + CLIPProcessor directory (save_pretrained)
    save_tiny_vlm(dir)             HF Qwen2.5-VL directory + its processor (save_pretrained)
    save_tiny_imagereward(dir)     ImageReward.pt (BLIP's key layout, plain state dict) + a BERT tokenizer
    save_tiny_geneval(dir)         HF Mask2Former (COCO's 80 classes, Swin backbone) + its image processor
    save_tiny_hpsv3(dir)           HPSv3.safetensors (the reward model's state dict, transformers < 4.52 key
                                   layout) + base/, a Qwen2-VL config + processor (save_pretrained)

Tokenizers are built locally: the real 49,408-token CLIP BPE from the vocabulary file open_clip ships
(token ids identical to open_clip's), and a byte-level BPE with Qwen's special tokens for the VLM.
Everything is seeded and deterministic. ``tiny_reward(name)`` builds (once, cached) and loads one:

    >>> from diffalign.rewards.tiny import tiny_reward
    >>> reward = tiny_reward("pickscore")            # a real PickScore reward with 2-layer towers
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .base import Reward

TINY_SEED = 0
TINY_VERSION = 1
TINY_IMAGE_SIZE = 32  # the towers' input resolution; any image size works, it is resized
TINY_EMBED_DIM = 768  # = ViT-L/14's, so the aesthetic head is the published 768-wide MLP
TINY_REWARDS = ("clip", "aesthetic", "hpsv2", "pickscore", "vlm", "imagereward", "hpsv3")
# Also built here, outside the device contract tests (transformers makes one Mask2Former parameter on the CPU).
TINY_EXTRA_REWARDS = ("geneval",)

_TINY_OPEN_CLIP_CFG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_TINY_OPEN_CLIP_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                              "interpolation": "bicubic", "resize_mode": "shortest"}
_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|image_pad|>", "<|video_pad|>"]
# A Qwen-style chat template: system/user/assistant turns, images as vision_start/image_pad/vision_end.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_open_clip(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write a tiny open_clip CLIP (~1.7 M params) as ``open_clip_config.json`` + safetensors."""
    from .clip import save_open_clip_folder

    out = Path(directory)
    save_open_clip_folder(_tiny_open_clip(seed), _TINY_OPEN_CLIP_CFG, _TINY_OPEN_CLIP_PREPROCESS, out)
    return out


def save_tiny_hps(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write ``open_clip_config.json`` + an HPS-format checkpoint; returns the checkpoint path."""
    from .clip import write_open_clip_config

    out = Path(directory)
    write_open_clip_config(out, _TINY_OPEN_CLIP_CFG, _TINY_OPEN_CLIP_PREPROCESS)
    checkpoint = out / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": _tiny_open_clip(seed + 1).state_dict()}, checkpoint)
    return checkpoint


def save_tiny_aesthetic_head(path: str | os.PathLike, embed_dim: int = TINY_EMBED_DIM, seed: int = TINY_SEED) -> Path:
    """Write a random aesthetic-predictor head as a torch state dict (the ``.pth`` format of the real one)."""
    from .aesthetic import AestheticHead

    generator = torch.Generator().manual_seed(seed)
    head = AestheticHead(embed_dim)
    for layer in head.layers:
        if isinstance(layer, torch.nn.Linear):  # gain 3 per layer, so scores spread over a few units
            layer.weight.data = torch.randn(layer.weight.shape, generator=generator) * 3.0 / layer.in_features**0.5
            layer.bias.data = torch.randn(layer.bias.shape, generator=generator) * 0.1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


def save_tiny_pickscore(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write a tiny transformers CLIPModel with a CLIPProcessor (CLIP BPE tokenizer, bicubic 32 px)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(directory)
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": TINY_IMAGE_SIZE, "patch_size": 8}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_bpe_tokenizer())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_vlm(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write a tiny Qwen2.5-VL (~0.1 M params) with a byte-level tokenizer, chat template and processor."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    out = Path(directory)
    tokenizer = qwen_byte_tokenizer()
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=_QWEN_CHAT_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end", "endoftext", "im_end")}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                     "bos_token_id": ids["endoftext"], "eos_token_id": ids["im_end"], "pad_token_id": ids["endoftext"],
                     "tie_word_embeddings": True},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [0]},
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_imagereward(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write ``ImageReward.pt`` in the published layout (BLIP ViT + BERT with cross-attention + MLP head,
    heads of width 64 as in the real one, 2 layers each, 32 px) and a WordPiece BERT tokenizer beside it."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from .imagereward import imagereward_mlp, transformers_key_to_blip

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w for prompt in _TINY_PROMPT_WORDS for w in prompt.split()})
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = BertTokenizer(vocab={piece: index for index, piece in enumerate(pieces)}, do_lower_case=True,
                              model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as ImageReward
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=TINY_IMAGE_SIZE, patch_size=16,
                                              layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=1, encoder_hidden_size=64,
                                        pad_token_id=0, bos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    mlp = imagereward_mlp(64)
    for module in [*vision.modules(), *text.modules(), *mlp.modules()]:
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):  # unit gain, so the image moves the score
            torch.nn.init.normal_(module.weight, std=1.0 / module.weight[0].numel() ** 0.5)
    state = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    state |= {f"text.{k}": v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    state |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    published = {transformers_key_to_blip(k): v.contiguous() for k, v in state.items()}
    published["blip.vision_proj.weight"] = torch.zeros(16, 64)  # in the real file, unused for scoring
    torch.save(published, out / "ImageReward.pt")
    return out


def save_tiny_hpsv3(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write ``base/`` (a tiny Qwen2-VL config, byte-level tokenizer, chat template, processor) and
    ``HPSv3.safetensors``: Qwen2-VL + HPSv3's rm_head, embeddings one row longer for ``<|Reward|>``, in the
    key layout of transformers < 4.52 (``model.layers.*``, ``visual.*``, ``lm_head``, ``rm_head.{0,3,5}``)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    from .hpsv3 import hpsv3_head

    out = Path(directory)
    tokenizer = qwen_byte_tokenizer()
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=_QWEN_CHAT_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end", "endoftext", "im_end")}
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer) + 1, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                     "bos_token_id": ids["endoftext"], "eos_token_id": ids["im_end"], "pad_token_id": ids["endoftext"]},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)
    config.save_pretrained(out / "base")  # the base model's config as published (its vocabulary size is replaced)
    processor.save_pretrained(out / "base")
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    head = hpsv3_head(32)
    for layer in head:
        if isinstance(layer, torch.nn.Linear):  # unit gain, so scores spread over a few units
            torch.nn.init.normal_(layer.weight, std=2.0 / layer.in_features**0.5)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = key[len("model."):]
        state[key] = value.clone().contiguous()
    state |= {f"rm_head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    save_file(state, out / "HPSv3.safetensors")
    return out


TINY_GENEVAL_BIASED_CLASS = 16  # "dog": the tiny detector's class head favours it, so detections pass 0.3


def save_tiny_geneval(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write a tiny COCO instance-segmentation Mask2Former (80 classes, 10 queries, Swin backbone) and a
    Mask2Former image processor (shortest edge 384, as the published COCO models)."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    out = Path(directory)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=10, num_labels=80, use_pretrained_backbone=False)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.bias[TINY_GENEVAL_BIASED_CLASS] += 8.0
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333}, size_divisor=32,
                                          num_labels=80, ignore_index=255, reduce_labels=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


_TINY_PROMPT_WORDS = ("a red apple on a table", "a cat", "two dogs running on a beach at sunset", "an astronaut",
                      "a photo of a blue car", "hello world")


def clip_bpe_tokenizer(model_max_length: int = 77):
    """The real CLIP BPE (49,408 tokens) as a transformers CLIPTokenizer, from open_clip's bundled vocab."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def qwen_byte_tokenizer():
    """A byte-level BPE with Qwen's chat/vision special tokens and merges making ``yes``/``no`` one token."""
    from transformers import Qwen2Tokenizer

    chars = _byte_level_chars()
    vocab = {char: index for index, char in enumerate(chars)}
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o"), ("y", "e"), ("ye", "s"), ("n", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS[1:]})
    return tokenizer


def tiny_reward_options(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Options that make ``load_reward(name, **options)`` load the tiny weights (built once, cached)."""
    if name not in TINY_REWARDS + TINY_EXTRA_REWARDS:
        raise ValueError(f"no tiny weights for reward {name!r}; choose one of {', '.join(TINY_REWARDS + TINY_EXTRA_REWARDS)}")
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    if name == "clip":
        return {"model": str(_cached(root, "open_clip", save_tiny_open_clip))}
    if name == "aesthetic":
        head = _cached(root, "aesthetic_head", lambda d: save_tiny_aesthetic_head(Path(d) / "aesthetic-model.pth"))
        return {"model": str(_cached(root, "open_clip", save_tiny_open_clip)), "head": str(head / "aesthetic-model.pth")}
    if name == "hpsv2":
        folder = _cached(root, "hps", save_tiny_hps)
        return {"model": str(folder), "checkpoint": str(folder / "HPS_v2.1_compressed.pt")}
    if name == "pickscore":
        return {"model": str(_cached(root, "pickscore", save_tiny_pickscore))}
    if name == "geneval":
        return {"detector": str(_cached(root, "geneval", save_tiny_geneval)),
                "clip_model": str(_cached(root, "open_clip", save_tiny_open_clip)), "clip_pretrained": None}
    if name == "hpsv3":
        folder = _cached(root, "hpsv3", save_tiny_hpsv3)
        return {"checkpoint": str(folder / "HPSv3.safetensors"), "base": str(folder / "base"), "pixels": 28 * 28 * 4}
    if name == "imagereward":
        folder = _cached(root, "imagereward", save_tiny_imagereward)
        return {"checkpoint": str(folder / "ImageReward.pt"), "tokenizer": str(folder)}
    return {"model": str(_cached(root, "vlm", save_tiny_vlm))}


def tiny_reward(name: str, cache_dir: str | os.PathLike | None = None, **options: Any) -> Reward:
    """``load_reward(name)`` on tiny random weights; rule-based names need no weights and pass through."""
    from .registry import load_reward

    extra = tiny_reward_options(name, cache_dir) if name in TINY_REWARDS + TINY_EXTRA_REWARDS else {}
    return load_reward(name, **{**extra, **options})


# ---------------------------------------------------------------------- helpers
def _tiny_open_clip(seed: int) -> torch.nn.Module:
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**_TINY_OPEN_CLIP_CFG).eval()


def _byte_level_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character map, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, shift = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


def _cache_root() -> Path:
    base = Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign"))
    return base / f"tiny-rewards-v{TINY_VERSION}"


def _cached(root: Path, name: str, build) -> Path:
    """Build into a temporary folder and rename into place, so no half-written folder is ever used."""
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}-{uuid.uuid4().hex}.tmp"
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
