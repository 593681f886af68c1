"""The embedded default models: tiny random-weight SD, SDXL, FLUX and SD3 pipelines.

They are the stock diffusers pipeline classes (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``FluxPipeline``, ``StableDiffusion3Pipeline``) with real transformers text encoders and
tokenizers written locally, built from small configs with a fixed seed, so every code path of
diffalign can run offline on a CPU. Each one is built once, saved with ``save_pretrained`` into a
cache folder and from then on loaded with ``DiffusionPipeline.from_pretrained``, the same call a
hub id or a local directory takes.

    >>> from diffalign.pipelines.tiny import tiny_model_dir
    >>> path = tiny_model_dir("tiny-sdxl")          # builds on first use, then cached
    >>> pipe = StableDiffusionXLPipeline.from_pretrained(path)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

TINY_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-sd3")
# Bump when a tiny config changes so old caches are not reused.
TINY_VERSION = 3
# The image size the tiny models are meant to run at. Their VAEs downsample by 8 like the real
# ones, so latents are 8x8: small enough that a training step takes a fraction of a second.
TINY_RESOLUTION = 64
TINY_SEED = 0
CLIP_MAX_LENGTH = 77


def cache_root() -> Path:
    """Folder holding built tiny models: ``$DIFFALIGN_CACHE`` or ``~/.cache/diffalign``."""
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign"))


def tiny_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the diffusers directory of tiny model ``name``, building it on first use.

    The build writes into a temporary folder and renames it into place, so a concurrent build
    or a killed one never leaves a half-written model behind.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{name}-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}-{uuid.uuid4().hex}.tmp"
    try:
        build_tiny_pipeline(name).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is identical (same seed, same configs).
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def copy_model_folder(source: Path, out_dir: str | os.PathLike) -> Path:
    """Copy the diffusers folder ``source`` to ``out_dir``, which must be new or empty
    (FileExistsError otherwise: nothing of the user's is overwritten). The copy is written beside
    ``out_dir`` and renamed into place, so a copy that fails part-way leaves no half folder."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose an empty or new folder")
    staging = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        shutil.copytree(source, staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_tiny(name: str, out_dir: str | os.PathLike) -> Path:
    """Write tiny model ``name`` as a standard diffusers directory at ``out_dir``."""
    return copy_model_folder(tiny_model_dir(name), out_dir)


def build_tiny_pipeline(name: str, seed: int = TINY_SEED):
    """Build tiny model ``name`` in memory (random weights from ``seed``, all modules in eval mode)."""
    builders = {"tiny-sd": _build_sd, "tiny-sdxl": _build_sdxl, "tiny-flux": _build_flux, "tiny-sd3": _build_sd3}
    if name not in builders:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    # fork_rng: building seeds torch; a caller's random stream must not depend on whether the
    # model was built in this process or found in the cache.
    with tempfile.TemporaryDirectory() as tok_dir, torch.random.fork_rng(devices=[]):
        pipe = builders[name](Path(tok_dir), seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


# --- tokenizers written locally --------------------------------------------------------------


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _clip_tokenizer(folder: Path):
    """A CLIP tokenizer over single bytes (514 tokens: bytes, their word-final forms, specials)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_MAX_LENGTH
    )


def _t5_tokenizer():
    """A unigram T5 tokenizer over printable ASCII (pad 0, eos 1, unk 2)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(i), -2.0) for i in range(33, 127)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip_text_config(vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32 if with_projection else 512,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="gelu",
    )


def _vae(latent_channels: int, **extra):
    """A stock ``AutoencoderKL`` (4 blocks, downsampling by 8 like the real ones) whose weights
    are set to a colour-preserving autoencoder (see ``_set_colour_autoencoder``)."""
    from diffusers import AutoencoderKL

    config = dict(scaling_factor=1.0)
    config.update(extra)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        **config,
    )
    _set_colour_autoencoder(vae)
    return vae


# Signal amplitude inside the tiny VAE: small enough that a GroupNorm (eps 1e-6) is linear on it.
_VAE_SIGNAL_SCALE = 1e-5


def _set_colour_autoencoder(vae) -> None:
    """Make the tiny VAE encode an image as its 8x8 block-average colours and decode by
    nearest-neighbour upsampling, instead of random weights.

    A random-weight VAE scrambles images: its GroupNorms remove global brightness and colour,
    so no reward on decoded images could respond to what a denoiser learns. Here every residual
    branch and attention output is zero (those blocks become identities), the 3x3 stride-2
    convolutions average 2x2 blocks, and the upsampling convolutions copy. The signal travels as
    channel pairs (+c, -c) at amplitude 1e-5, so each GroupNorm sees zero mean and a variance far
    below its eps (it acts as a fixed linear scale), and SiLU(z) - SiLU(-z) = z undoes the
    activation exactly. Latents: channels 0-2 = RGB in [-1, 1] per 8x8 block, channel 3 = 0.
    """
    import torch

    alpha = _VAE_SIGNAL_SCALE
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

        def copy_channels(conv) -> None:  # identity over the shared channels (1x1 or 3x3 centre tap)
            k = conv.kernel_size[0] // 2
            for c in range(min(conv.in_channels, conv.out_channels)):
                conv.weight[c, c, k, k] = 1.0

        def pairs_in(conv, channels: int) -> None:  # input channel i -> (+alpha, -alpha) at 2i, 2i+1
            for i in range(channels):
                conv.weight[2 * i, i, 1, 1] = alpha
                conv.weight[2 * i + 1, i, 1, 1] = -alpha

        def pairs_out(conv, channels: int, norm) -> None:  # (2i, 2i+1) -> output i, undoing the norm
            gain = (norm.eps ** 0.5) / alpha
            for i in range(channels):
                conv.weight[i, 2 * i, 1, 1] = gain
                conv.weight[i, 2 * i + 1, 1, 1] = -gain

        for coder in (vae.encoder, vae.decoder):
            for module in coder.modules():
                if module.__class__.__name__ == "ResnetBlock2D" and module.conv_shortcut is not None:
                    copy_channels(module.conv_shortcut)
        for block in vae.encoder.down_blocks:
            for down in block.downsamplers or []:
                for c in range(down.conv.out_channels):
                    down.conv.weight[c, c, 0:2, 0:2] = 0.25  # after diffusers' (0,1,0,1) pad: 2x2 mean
        for block in vae.decoder.up_blocks:
            for up in block.upsamplers or []:
                copy_channels(up.conv)  # nearest-neighbour x2, then copy
        pairs_in(vae.encoder.conv_in, 3)
        pairs_out(vae.encoder.conv_out, 3, vae.encoder.conv_norm_out)
        latent_channels = vae.config.latent_channels
        vae.encoder.conv_out.bias[latent_channels:] = -30.0  # log-variance: std ~ 3e-7
        pairs_in(vae.decoder.conv_in, 3)
        pairs_out(vae.decoder.conv_out, 3, vae.decoder.conv_norm_out)
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:
                copy_channels(conv)


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# --- the four families -----------------------------------------------------------------------


def _build_sd(tok_dir: Path, seed: int):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer(tok_dir / "clip")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _vae(latent_channels=4)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(tok_dir: Path, seed: int):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer(tok_dir / "clip")
    tokenizer_2 = _clip_tokenizer(tok_dir / "clip2")
    time_embed_dim = 8
    pooled_dim = 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        cross_attention_dim=64,  # widths of both text encoders, concatenated
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _vae(latent_channels=4)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer_2), True))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_ddim_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_flux(tok_dir: Path, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer(tok_dir / "clip")
    tokenizer_2 = _t5_tokenizer()
    latent_channels = 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 patches are packed into channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 1)
    vae = _vae(
        latent_channels=latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,  # FLUX.1's values, so the shift-and-scale code path is exercised
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _build_sd3(tok_dir: Path, seed: int):
    """SD3 / SD3.5 in miniature: CLIP-L and CLIP-G with projections (pooled 32 + 32), a T5 as
    wide as both CLIPs' hidden states side by side (64, SD3's joint-attention layout), an MMDiT
    with one dual-attention block and RMS q/k norm like SD3.5, and the SD3 VAE's shift/scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer(tok_dir / "clip")
    tokenizer_2 = _clip_tokenizer(tok_dir / "clip2")
    tokenizer_3 = _t5_tokenizer()
    latent_channels = 4
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5 width = CLIP-L + CLIP-G hidden widths
        caption_projection_dim=32,
        pooled_projection_dim=64,  # CLIP-L + CLIP-G projection widths
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    torch.manual_seed(seed + 1)
    vae = _vae(
        latent_channels=latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,  # SD3's values, so the shift-and-scale code path is exercised
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), True))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer_2), True))
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_ff=37,
            d_kv=16,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3 / SD3.5's scheduler config
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
