"""The untrained shapes-world pipelines: stock diffusers classes at sizes a CPU can pretrain.

Every family gets the same two pieces that fit the world:

* a word-level tokenizer: the CLIP tokenizers keep their byte-level BPE but get merges that make
  every word of the world's grammar one token; the T5 tokenizers are unigram models with one
  piece per grammar word (and single characters as a fallback);
* the shapes VAE: a stock ``AutoencoderKL`` with three blocks (downsampling by 4) set to the
  colour-preserving autoencoder of ``pipelines.tiny``, so a 64 px world image (16 x 16 cells of
  4 x 4 pixels) is a 16 x 16 latent of cell colours and decodes back exactly. SD/SDXL latents have
  4 channels, FLUX/SD3 16 (channels 0-2 carry RGB in [-1, 1], the rest stay 0 for world images).
  FLUX and SD3 can take a two-block VAE instead (downsampling by 2, a 32 x 32 latent): their 2 x 2
  patches are then one token per cell rather than one per 2 x 2 cells.

The denoisers and text encoders start from a fixed seed and are trained by ``diffalign.world``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from diffalign.pipelines.loading import SHAPES_T5_LENGTH as T5_LENGTH
from diffalign.pipelines.tiny import _byte_level_chars, _set_colour_autoencoder
from diffalign.rewards.shapes_world import COLORS, IMAGE_SIZE, NUMBER_WORDS, RELATIONS, SHAPES

FAMILIES = ("sd", "sdxl", "flux", "sd3")
LATENT_SIZE = IMAGE_SIZE // 4
CLIP_LENGTH = 20  # tokens, with start and end: the grammar's longest caption is 12
TEXT_WIDTH = 64

WORDS = tuple(dict.fromkeys(
    ["a", "photo", "of", "and"] + list(NUMBER_WORDS) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
    + [w for rel in RELATIONS for w in rel.split()]
))


# --- tokenizers ------------------------------------------------------------------------------


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merges of one word's symbols, lowest rank first (what CLIP's tokenizer does)."""
    while len(word) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    return word


def clip_word_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` whose vocabulary is the 512 byte symbols, one token per grammar word
    (built by merges added word by word, so later merges never split an earlier word), and the
    two special tokens last. ``model_max_length`` is CLIP_LENGTH."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_LENGTH)


def t5_word_tokenizer():
    """A unigram ``T5TokenizerFast``: pad 0, eos 1, unk 2, one piece per grammar word, then
    lower-case letters as a fallback for anything else."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(chr(i), -10.0) for i in range(33, 127)]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = T5_LENGTH
    return tokenizer


def _clip_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=width // 4, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    ))


VAE_DOWNSAMPLES = {2: 2, 4: 3}  # downsampling factor -> VAE blocks


def shapes_vae(latent_channels: int, downsample: int = 4, **extra):
    """The shapes VAE (see the module docstring): downsampling by ``downsample`` (4 or 2), exact on
    world images."""
    from diffusers import AutoencoderKL

    blocks = VAE_DOWNSAMPLES[downsample]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(16, 32, 32)[:blocks], layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=IMAGE_SIZE,
        **{"scaling_factor": 1.0, **extra},
    )
    _set_colour_autoencoder(vae)
    return vae


def _ddpm_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16, **extra,
    )


# --- the four families -----------------------------------------------------------------------


def build_untrained(family: str, seed: int, adaln_zero: bool = False, vae_downsample: int = 4):
    """The untrained shapes pipeline of ``family`` (weights from ``seed``; every module in eval mode).
    ``adaln_zero`` (FLUX/SD3): start the transformer as DiT's adaLN-Zero does, see :func:`adaln_zero_init`.
    ``vae_downsample`` (FLUX/SD3 may take 2): the shapes VAE's downsampling factor."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if vae_downsample != 4 and (family not in ("flux", "sd3") or vae_downsample not in VAE_DOWNSAMPLES):
        raise ValueError(f"vae_downsample={vae_downsample} is for FLUX/SD3 and one of {sorted(VAE_DOWNSAMPLES)}")
    with tempfile.TemporaryDirectory() as tok_dir, torch.random.fork_rng(devices=[]):
        pipe = {"sd": _sd, "sdxl": _sdxl, "flux": _flux, "sd3": _sd3}[family](Path(tok_dir), seed, vae_downsample)
    if adaln_zero:
        adaln_zero_init(pipe.transformer)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adaln_zero_init(transformer) -> None:
    """Zero every adaptive-norm modulation layer (shift, scale and gate) and the output projection
    of a FLUX or SD3 transformer, in place: each block then starts as the identity and the model
    predicts 0, DiT's adaLN-Zero initialisation (diffusers' classes use PyTorch's default init,
    since their weights are normally loaded)."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    with torch.no_grad():
        layers = [m.linear for m in transformer.modules()
                  if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous))]
        for layer in layers + [transformer.proj_out]:
            layer.weight.zero_()
            layer.bias.zero_()


def _sd(tok_dir: Path, seed: int, vae_downsample: int):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = clip_word_tokenizer(tok_dir / "clip")
    torch.manual_seed(seed)
    unet = _unet(TEXT_WIDTH)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=shapes_vae(4, vae_downsample), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_ddpm_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl(tok_dir: Path, seed: int, vae_downsample: int):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_word_tokenizer(tok_dir / "clip"), clip_word_tokenizer(tok_dir / "clip2")
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = _unet(
        2 * TEXT_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH, use_linear_projection=True,
    )
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2))
    return StableDiffusionXLPipeline(
        vae=shapes_vae(4, vae_downsample), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_ddpm_scheduler(),
        force_zeros_for_empty_prompt=False,  # the unconditional branch is the encoded "" it was trained on
        add_watermarker=False,
    )


def _flux(tok_dir: Path, seed: int, vae_downsample: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = clip_word_tokenizer(tok_dir / "clip"), t5_word_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    text_encoder_2 = _t5(tokenizer_2, TEXT_WIDTH)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=shapes_vae(16, vae_downsample, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _sd3(tok_dir: Path, seed: int, vae_downsample: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_word_tokenizer(tok_dir / "clip"), clip_word_tokenizer(tok_dir / "clip2")
    tokenizer_3 = t5_word_tokenizer()
    latent_size = IMAGE_SIZE // vae_downsample
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=latent_size // 2,
    )
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2))
    text_encoder_3 = _t5(tokenizer_3, 2 * TEXT_WIDTH)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=shapes_vae(16, vae_downsample, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
