"""Published architecture configs of the supported families, for building full-size models
without downloading anything: on the meta device (checking LoRA target names) or with random
weights (benchmarks at real sizes). Values from the checkpoints' own config files.
"""

from __future__ import annotations

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)

SDXL_BASE_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)

FLUX_DEV_TRANSFORMER = dict(
    attention_head_dim=128,
    guidance_embeds=True,
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    patch_size=1,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json: 24 MMDiT blocks, the first 13
# with SD3.5's dual attention (an extra image self-attention), RMS q/k norm.
SD35_MEDIUM_TRANSFORMER = dict(
    attention_head_dim=64,
    caption_projection_dim=1536,
    dual_attention_layers=tuple(range(13)),
    in_channels=16,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=24,
    out_channels=16,
    patch_size=2,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    sample_size=128,
)


SDXL_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

# CLIP ViT-L/14 text tower (SD1.5, SDXL's first encoder) and OpenCLIP bigG/14 (SDXL's second).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def build_random_sdxl(device: str = "cpu", dtype=None):
    """A StableDiffusionXLPipeline with SDXL base 1.0's architecture and random weights (the
    tokenizers are the tiny models' byte-level ones). For benchmarks: nothing is downloaded."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline("tiny-sdxl")
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_BIGG_TEXT))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    return _finish(pipe, dtype)


# black-forest-labs/FLUX.1-dev vae/config.json and stabilityai/stable-diffusion-3.5-medium
# vae/config.json: the 16-channel autoencoder without quant convs, each with its shift and scale.
FLOW_VAE = dict(SDXL_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
FLUX_VAE_FACTORS = dict(shift_factor=0.1159, scaling_factor=0.3611)
SD35_VAE_FACTORS = dict(shift_factor=0.0609, scaling_factor=1.5305)
# google/t5-v1_1-xxl's encoder, the T5 of FLUX.1 and SD3.5.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def _finish(pipe, dtype):
    import torch

    if dtype is not None:
        pipe.to(dtype=dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def build_random_flux(device: str = "cpu", dtype=None):
    """A FluxPipeline with FLUX.1-dev's architecture (transformer, VAE, CLIP-L, T5-XXL) and random
    weights; the tokenizers are the tiny model's. For GPU benchmarks: nothing is downloaded."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline("tiny-flux")
    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**{**FLOW_VAE, **FLUX_VAE_FACTORS})
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L_TEXT))
        text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _finish(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tiny.tokenizer,
                                text_encoder_2=text_encoder_2, tokenizer_2=tiny.tokenizer_2, transformer=transformer), dtype)


def build_random_sd3(device: str = "cpu", dtype=None):
    """A StableDiffusion3Pipeline with SD3.5 Medium's architecture (MMDiT, VAE, CLIP-L, CLIP-G,
    T5-XXL) and random weights; the tokenizers are the tiny model's."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline("tiny-sd3")
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**{**FLOW_VAE, **SD35_VAE_FACTORS})
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_L_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_BIGG_TEXT))
        text_encoder_3 = T5EncoderModel(T5Config(**T5_XXL))
    return _finish(StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
        tokenizer=tiny.tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tiny.tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tiny.tokenizer_3, transformer=transformer), dtype)
