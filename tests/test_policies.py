"""Policy layer: forward process and targets against diffusers' own schedulers, guidance,
image encode/decode, SDXL micro-conditioning, and model loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.errors import UserError
from diffalign.pipelines.loading import detect_family, load_policy, pipeline_call_defaults

FAMILIES = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}


@pytest.fixture(scope="module")
def policies():
    return {name: load_policy(name) for name in FAMILIES}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_and_shapes(policies, name):
    policy = policies[name]
    assert policy.family == FAMILIES[name]
    assert detect_family(name) == FAMILIES[name]
    assert policy.default_resolution() == 64
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = policy.encode_images(pixels, torch.Generator().manual_seed(0))
    assert latents.shape == (2, *policy.latent_shape(64, 64)) and latents.dtype == torch.float32
    images = policy.decode(latents)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_ddpm_forward_process_and_targets_match_diffusers(policies):
    from diffusers import DDPMScheduler

    policy = policies["tiny-sd"]
    ddpm = DDPMScheduler.from_config(policy.pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(policy.noise(x0, noise, t), ddpm.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(policy.target(x0, noise, t), noise)
    policy.prediction_type = "v_prediction"
    try:
        torch.testing.assert_close(policy.target(x0, noise, t), ddpm.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)
    finally:
        policy.prediction_type = "epsilon"


def test_flow_forward_process_matches_diffusers(policies):
    policy = policies["tiny-flux"]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250.0, 900.0])
    scheduler = policy.flow_scheduler
    scheduler.set_timesteps(sigmas=[0.9, 0.25], mu=0.5)
    expected = scheduler.scale_noise(x0, scheduler.timesteps, noise)
    # scale_noise uses the shifted schedule; compare at the sigmas it used
    used = scheduler.sigmas[:2]
    torch.testing.assert_close(policy.noise(x0, noise, used * 1000), expected, rtol=1e-5, atol=1e-5)
    # x_sigma = (1 - sigma) x0 + sigma noise, target = noise - x0 (hand numbers)
    one = torch.ones(1, 1, 1, 1)
    assert policy.noise(one * 2, one * 4, torch.tensor([250.0])).item() == pytest.approx(0.75 * 2 + 0.25 * 4)
    assert policy.target(one * 2, one * 4, torch.tensor([250.0])).item() == pytest.approx(2.0)
    sigmas = policy.training_timesteps(1000, torch.Generator().manual_seed(0)) / 1000
    assert 0 < sigmas.min() and sigmas.max() < 1 and abs(sigmas.mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("name", list(FAMILIES))
def test_guidance_combines_both_branches(policies, name):
    policy = policies[name]
    cond = policy.encode_prompts(["a red cat", "a dog"], negative_prompts=["blurry", "ugly"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *policy.latent_shape(64, 64), generator=g)
    t = policy.schedule(4, 64, 64)[0][1]
    with torch.no_grad():
        cond_out = policy.predict(x, t, cond)
        uncond_out = policy.predict(x, t, cond.uncond)
        guided = policy.predict(x, t, cond, guidance_scale=4.0)
    torch.testing.assert_close(guided, uncond_out + 4.0 * (cond_out - uncond_out), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cond_out, uncond_out)


def test_sdxl_time_ids_carry_size_and_crop(policies):
    policy = policies["tiny-sdxl"]
    cond = policy.encode_prompts(["a", "b"], height=64, width=64, original_sizes=[(512, 768), (64, 64)], crops_top_left=[(0, 32), (0, 0)])
    assert cond.time_ids.tolist() == [[512, 768, 0, 32, 64, 64], [64, 64, 0, 0, 64, 64]]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = policy.predict(x, torch.tensor(500), cond)
        b = policy.predict(x, torch.tensor(500), cond.select([1, 1]))
    assert not torch.allclose(a[0], b[0])  # micro-conditioning reaches the UNet


def test_group_noise_is_shared_within_groups(policies):
    noise = policies["tiny-sd"].initial_noise(6, 64, 64, torch.Generator().manual_seed(0), group_size=3)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[2], noise[3])


def test_tiny_call_defaults():
    assert pipeline_call_defaults("tiny-flux") == {"height": 64, "width": 64, "max_sequence_length": 32}
    assert pipeline_call_defaults("stabilityai/stable-diffusion-xl-base-1.0") == {}


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="cannot load it") as err:
        load_policy(str(tmp_path / "nope"))
    assert "\n" not in str(err.value) and "model=/path/to/dir" in str(err.value)


def test_unsupported_pipeline_class_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="KandinskyPipeline; diffalign supports StableDiffusionPipeline"):
        load_policy(str(tmp_path))


def test_single_file_checkpoint_is_explained(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match="single file"):
        load_policy(str(path))
