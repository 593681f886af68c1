"""The SD3 / SD3.5 family: the tiny StableDiffusion3Pipeline, its policy against the stock
pipeline call, the stock LoRA round trip, and the default LoRA targets on SD3.5-Medium."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.config import LoraSettings
from diffalign.lora import DEFAULT_TARGET_MODULES, LORA_WEIGHT_NAME, add_lora, lora_parameters, matching_module_names, save_lora
from diffalign.pipelines.loading import detect_family, load_policy, pipeline_call_defaults
from diffalign.pipelines.tiny import tiny_model_dir

RES = 64


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny-sd3")


def test_tiny_sd3_is_the_stock_pipeline_and_its_family(policy):
    index = json.loads((tiny_model_dir("tiny-sd3") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer"} <= set(index)
    assert detect_family("tiny-sd3") == "sd3" and policy.family == "sd3"
    assert type(policy.denoiser).__name__ == "SD3Transformer2DModel"
    assert policy.prediction_type == "flow" and policy.default_resolution() == RES
    assert policy.latent_shape(RES, RES) == (4, 8, 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        policy.latent_shape(72, 64)
    assert pipeline_call_defaults("tiny-sd3") == {"height": RES, "width": RES, "max_sequence_length": 32}
    cond = policy.encode_prompts(["a red cube", "a dog"], with_uncond=True)
    # CLIP-L + CLIP-G tokens (77) then T5 tokens (32); pooled = both CLIP projections (32 + 32)
    assert cond.embeds.shape == (2, 77 + 32, 64) and cond.pooled.shape == (2, 64)
    assert cond.uncond.embeds.shape == cond.embeds.shape


def test_schedule_is_the_stock_shifted_one(policy):
    timesteps, next_timesteps = policy.schedule(4, RES, RES)
    # shift 3: sigma' = 3 s / (1 + 2 s) over linspace(1, sigma_min, 4), sigma_min = shift(1/1000)
    s_min = 3 * 0.001 / (1 + 2 * 0.001)
    s = torch.linspace(1.0, s_min, 4, dtype=torch.float64)
    expected = 3 * s / (1 + 2 * s) * 1000
    torch.testing.assert_close(timesteps.double(), expected, rtol=1e-5, atol=1e-3)
    assert next_timesteps[-1].item() == 0.0 and torch.equal(next_timesteps[:-1], timesteps[1:])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_zero_noise_sample_equals_stock_pipeline(policy, guidance):
    """The ODE sampler (noise level 0) is the stock call, with and without true CFG against a
    negative prompt."""
    prompts = ["a red cube", "a blue sphere"]
    latents = policy.initial_noise(2, RES, RES, torch.Generator().manual_seed(0))
    negatives = ["blurry", "ugly"] if guidance > 1 else None
    cond = policy.encode_prompts(prompts, negative_prompts=negatives)
    traj = policy.sample(cond, 4, guidance_scale=guidance, noise_level=0.0, latents=latents, height=RES, width=RES)
    with torch.no_grad():
        stock = policy.pipe(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=guidance,
                            latents=latents, output_type="latent", **pipeline_call_defaults("tiny-sd3")).images
        stock_images = policy.pipe(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=guidance,
                                   latents=latents, output_type="pt", **pipeline_call_defaults("tiny-sd3")).images
    torch.testing.assert_close(traj.final_latents, stock.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.images, stock_images.float(), rtol=0, atol=1e-5)
    assert torch.equal(traj.log_probs, torch.zeros(2, 4))


def test_sde_log_probs_recompute_and_guidance_combines_branches(policy):
    cond = policy.encode_prompts(["a red cube", "a blue sphere"], negative_prompts=["blurry"] * 2)
    traj = policy.sample(cond, 3, guidance_scale=3.0, noise_level=0.7, generator=torch.Generator().manual_seed(1),
                         decode=False)
    assert traj.latents.shape == (2, 4, 4, 8, 8) and (traj.log_probs != 0).all()
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(policy.log_prob(traj, step), traj.log_probs[:, step], rtol=0, atol=1e-5)
        x, t = traj.latents[:, 1], traj.timesteps[1]
        guided = policy.predict(x, t, cond, guidance_scale=3.0)
        c, u = policy.predict(x, t, cond), policy.predict(x, t, cond.uncond)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)
    assert (c - u).abs().max() > 1e-3  # the negative prompt reaches the transformer


def test_stock_load_lora_weights_reproduces_diffalign_images(tiny_pipe, tmp_path):
    """A LoRA trained by diffalign (alpha = 2 x rank), loaded into a fresh stock
    StableDiffusion3Pipeline with no diffalign code, gives the same images as diffalign's policy."""
    policy = load_policy("tiny-sd3")
    add_lora(policy.denoiser, "sd3", LoraSettings(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(policy.denoiser).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    prompts = ["a red cube on a table"]
    latents = policy.initial_noise(1, RES, RES, torch.Generator().manual_seed(3))
    cond = policy.encode_prompts(prompts, with_uncond=True)
    ours = policy.sample(cond, 4, guidance_scale=4.5, noise_level=0.0, latents=latents).images
    with policy.reference():
        base = policy.sample(cond, 4, guidance_scale=4.5, noise_level=0.0, latents=latents).images
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the picture, so the test can fail

    out = save_lora(policy.pipe, policy.denoiser, tmp_path / "final", LoraSettings(rank=4, alpha=8), method="toy")
    assert (out / LORA_WEIGHT_NAME).is_file()
    fresh = tiny_pipe("tiny-sd3")
    assert type(fresh).__name__ == "StableDiffusion3Pipeline"
    fresh.load_lora_weights(out)
    with torch.no_grad():
        stock = fresh(prompts, num_inference_steps=4, guidance_scale=4.5, latents=latents, output_type="pt",
                      **pipeline_call_defaults("tiny-sd3")).images
    assert (stock - ours).abs().max() < 1e-5


def test_default_targets_match_full_size_sd35_medium():
    """Every default target is a Linear of SD3.5-Medium's transformer (built on the meta device
    from its published config): 24 blocks, the last one without a context output projection."""
    from diffusers import SD3Transformer2DModel

    from diffalign.pipelines.reference_configs import SD35_MEDIUM_TRANSFORMER

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    assert len(model.transformer_blocks) == 24
    modules = dict(model.named_modules())
    counts = {}
    for target in DEFAULT_TARGET_MODULES["sd3"]:
        names = matching_module_names(model, target)
        assert all(isinstance(modules[n], torch.nn.Linear) for n in names), target
        counts[target] = len(names)
    assert counts == {name: (23 if name == "attn.to_add_out" else 24) for name in DEFAULT_TARGET_MODULES["sd3"]}
    assert not any(".attn2." in n for t in DEFAULT_TARGET_MODULES["sd3"] for n in matching_module_names(model, t))


def test_export_tiny_sd3_is_a_standard_diffusers_folder(tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    assert main(["export-tiny", "sd3", str(tmp_path / "tiny-sd3")]) == 0
    assert "wrote tiny-sd3" in capsys.readouterr().out
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "tiny-sd3")
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    from PIL import Image

    out = tmp_path / "cat.png"
    assert main(["generate", "--model", "tiny-sd3", "--prompt", "a red cat", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (RES, RES)


def test_npo_guidance_on_sd3_routes_the_negative_prompt_branch_through_the_negative_lora(tmp_path):
    """enable_npo on a stock StableDiffusion3Pipeline: the CFG batch [uncond, cond] is split, the
    unconditional half runs with the negative LoRA, which equals guiding by hand with two models,
    eps_neg(uncond) + w (eps_pos(cond) - eps_neg(uncond)); disable_npo restores the stock output."""
    from diffalign.pipelines.loading import load_pipeline, policy_for
    from diffalign.pipelines.npo import disable_npo, enable_npo

    donor = load_policy("tiny-sd3")
    add_lora(donor.denoiser, "sd3", LoraSettings(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in lora_parameters(donor.denoiser).values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    negative_dir = save_lora(donor.pipe, donor.denoiser, tmp_path / "neg", extra_metadata={"negative": "true"})

    pipe = load_pipeline("tiny-sd3")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def stock_call():
        with torch.no_grad():
            return pipe("a red cube", guidance_scale=4.0, num_inference_steps=3, latents=latents.clone(),
                        output_type="latent", **pipeline_call_defaults("tiny-sd3")).images

    stock = stock_call()
    enable_npo(pipe, negative_dir)
    with_npo = stock_call()
    positive, negative = policy_for(pipe, resolution=RES, max_sequence_length=32), donor
    cond = positive.encode_prompts(["a red cube"], with_uncond=True)
    timesteps, next_timesteps = positive.schedule(3, RES, RES)
    x = latents.clone()
    with torch.no_grad():
        for t, t_next in zip(timesteps, next_timesteps):
            eps_neg = negative.predict(x, t, cond.uncond)
            eps = eps_neg + 4.0 * (positive.predict(x, t, cond) - eps_neg)
            x = positive.step(eps, x, t, t_next, 0.0, timesteps)[0]
    assert (with_npo - stock).abs().max() > 1e-2  # the negative LoRA changes the sample
    torch.testing.assert_close(with_npo, x, rtol=0, atol=1e-5)
    disable_npo(pipe)
    assert torch.equal(stock_call(), stock)
