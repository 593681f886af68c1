"""DiffusionNFT: the loss against hand numbers, the old adapter (a second peft adapter, its EMA
and decay schedules), the DPM-Solver++ sampler, and the trainer on the tiny flow families
(reward raised on images sampled from the trained LoRA, bitwise resume with the old adapter)."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from diffalign import lora
from diffalign.config import LoraSettings, get_method, load_config
from diffalign.errors import UserError
from diffalign.losses import diffusion_nft_loss, nft_optimality
from diffalign.pipelines.base import adapter_only
from diffalign.trainers.diffusion_nft import (
    OLD_ADAPTER,
    add_old_adapter,
    ema_toward,
    flow_dpm2_sample,
    old_decay,
)

# --- the loss ------------------------------------------------------------------------------------


def test_optimality_maps_clipped_advantages_to_unit_interval():
    """m = 5: r = clip(A, -5, 5) / 10 + 1/2."""
    r = nft_optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0]), 5.0)
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def test_nft_loss_matches_hand_computation():
    """beta = 0.5, m = 2, two samples of 2 values (shape [2, 1, 1, 2]).

    Sample 1: x0 = (0, 0), x0_theta = (1, -1), x0_old = (0, 0), A = 2 -> r = 1.
        x0+ = 0.5 (1, -1) + 0.5 (0, 0) = (0.5, -0.5): mean sq 0.25 / mean abs 0.5 = L+ = 0.5
        x0- = 1.5 (0, 0) - 0.5 (1, -1) = (-0.5, 0.5): L- = 0.5;  r L+ + (1 - r) L- = 0.5
    Sample 2: x0 = (1, 1), x0_theta = (1, 3), x0_old = (1, 2), A = -1 -> r = -1/2/2 + 1/2 = 0.25.
        x0+ = (1, 2.5), error (0, 1.5): mean sq 1.125 / mean abs 0.75 = L+ = 1.5
        x0- = 1.5 (1, 2) - 0.5 (1, 3) = (1, 1.5), error (0, 0.5): 0.125 / 0.25 = L- = 0.5
        0.25 * 1.5 + 0.75 * 0.5 = 0.75
    policy = m * mean(0.5, 0.75) / beta = 2 * 0.625 / 0.5 = 2.5
    KL term: kl_beta 0.5 * mean(0.1, 0.3) = 0.1 -> loss 2.6.
    """
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    x0_theta = torch.tensor([[1.0, -1.0], [1.0, 3.0]]).view(2, 1, 1, 2).requires_grad_(True)
    x0_old = torch.tensor([[0.0, 0.0], [1.0, 2.0]]).view(2, 1, 1, 2).requires_grad_(True)
    advantages = torch.tensor([2.0, -1.0])
    loss, metrics = diffusion_nft_loss(x0_theta, x0_old, x0, advantages, beta=0.5, adv_clip_max=2.0)
    assert loss.item() == pytest.approx(2.5)
    assert metrics["positive_loss"].item() == pytest.approx((0.5 + 1.5) / 2)
    assert metrics["negative_loss"].item() == pytest.approx((0.5 + 0.5) / 2)
    assert metrics["r"].item() == pytest.approx((1.0 + 0.25) / 2)
    loss.backward()
    assert x0_old.grad is None and x0_theta.grad.abs().sum() > 0  # the old model gets no gradient
    with_kl, metrics = diffusion_nft_loss(x0_theta, x0_old, x0, advantages, 0.5, 2.0, kl=torch.tensor([0.1, 0.3]), kl_beta=0.5)
    assert with_kl.item() == pytest.approx(2.6) and metrics["kl_ref"].item() == pytest.approx(0.2)


def test_beta_one_and_r_one_is_the_weighted_x0_regression():
    """beta = 1, r = 1: x0+ = x0_theta, so the loss is m * mean(||x0_theta - x0||^2 / mean|x0_theta - x0|),
    whatever the old model predicts."""
    g = torch.Generator().manual_seed(0)
    x0, x0_theta = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    advantages = torch.full((3,), 7.0)  # >= m: r = 1
    expected = 5.0 * (((x0_theta - x0) ** 2).mean(dim=(1, 2, 3)) / (x0_theta - x0).abs().mean(dim=(1, 2, 3))).mean()
    for seed in (1, 2):
        x0_old = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        loss, _ = diffusion_nft_loss(x0_theta, x0_old, x0, advantages, beta=1.0, adv_clip_max=5.0)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_weight_floor_keeps_an_exact_prediction_finite():
    x0 = torch.ones(1, 1, 2, 2)
    x0_theta = x0.clone().requires_grad_(True)
    loss, _ = diffusion_nft_loss(x0_theta, x0.clone(), x0, torch.zeros(1), beta=1.0, adv_clip_max=5.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x0_theta.grad).all()


# --- the old adapter --------------------------------------------------------------------------------


def test_old_decay_follows_the_reference_schedules():
    assert [old_decay(s, 0) for s in (0, 100, 10_000)] == [0.0, 0.0, 0.0]
    assert [old_decay(s, 1) for s in (0, 100, 499, 2_000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert [old_decay(s, 2) for s in (0, 74, 75, 76, 175, 1_000)] == pytest.approx([0.0, 0.0, 0.0, 0.0075, 0.75, 0.999])


def test_old_adapter_is_a_second_peft_adapter_with_an_exact_ema():
    from diffalign.pipelines.loading import load_policy

    policy = load_policy("tiny-sd3")
    params = lora.add_lora(policy.denoiser, "sd3", LoraSettings(rank=4))
    old = add_old_adapter(policy.denoiser)
    trained = lora.lora_parameters(policy.denoiser)
    assert set(policy.denoiser.peft_config) == {"default", OLD_ADAPTER} and old.keys() == trained.keys()
    assert all(torch.equal(old[k], trained[k]) and old[k] is not trained[k] for k in old)
    assert all(p.requires_grad for p in params) and not any(p.requires_grad for p in old.values())
    with torch.no_grad():
        for k, p in trained.items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))) * 0.1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(["a red cube", "a dog"])
    with torch.no_grad():
        theta = policy.predict(x, 600.0, cond)
        with adapter_only(policy.denoiser, OLD_ADAPTER):
            before = policy.predict(x, 600.0, cond)
        with policy.reference():
            base = policy.predict(x, 600.0, cond)
    assert torch.equal(before, base) and (theta - base).abs().max() > 1e-3  # old still the zero-B copy
    assert all(p.requires_grad for p in params) and not any(p.requires_grad for p in old.values())

    expected = {k: 0.25 * old[k].detach().clone() + 0.75 * trained[k].detach() for k in old}
    ema_toward(old, trained, 0.25)
    assert all(torch.equal(old[k], expected[k]) for k in old)
    ema_toward(old, trained, 0.0)  # decay 0: a copy
    with torch.no_grad(), adapter_only(policy.denoiser, OLD_ADAPTER):
        copied = policy.predict(x, 600.0, cond)
    torch.testing.assert_close(copied, theta, rtol=0, atol=1e-6)


# --- the sampler -------------------------------------------------------------------------------------


def test_dpm2_equals_diffusers_multistep_dpm_solver_and_beats_euler_on_a_gaussian_flow():
    """Data x0 ~ N(mu, s^2): the exact velocity at x_sigma is (x - E[x0 | x_sigma]) / sigma with
    E[x0 | x] = mu + (1 - sigma) s^2 (x - (1 - sigma) mu) / ((1 - sigma)^2 s^2 + sigma^2), and the
    ODE carries noise z to mu + s z. Ten steps of the shifted (shift 3) flow schedule: the solver
    is diffusers' DPMSolverMultistepScheduler (DPM-Solver++, order 2, lower-order final step) step
    for step, and lands closer to the exact endpoint than Euler on the same sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    mu, s = 1.0, 0.5

    def velocity(x, t):
        sigma = float(t) / 1000.0
        x0_mean = mu + (1 - sigma) * s**2 * (x - (1 - sigma) * mu) / ((1 - sigma) ** 2 * s**2 + sigma**2)
        return (x - x0_mean) / sigma

    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=2,
        algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True,
    )
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()
    z = torch.tensor([-1.5, 0.3, 2.0])
    stock = z.clone()
    for i, t in enumerate(scheduler.timesteps):
        stock = scheduler.step(velocity(stock, sigmas[i] * 1000), t, stock).prev_sample
    ours = flow_dpm2_sample(velocity, z.clone(), sigmas)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    euler = z.clone()
    for i in range(10):
        euler = euler + float(sigmas[i + 1] - sigmas[i]) * velocity(euler, sigmas[i] * 1000)
    exact = mu + s * z
    assert (ours - exact).abs().max() < 0.8 * (euler - exact).abs().max()


# --- the trainer ---------------------------------------------------------------------------------------


def _config(out, model: str = "tiny-sd3", train=None, resume=None, init_lora=None, **nft):
    return load_config({"init_lora": init_lora,
        "method": "diffusion_nft", "model": model, "output_dir": str(out), "seed": 0, "lora": {"rank": 4}, "resume": resume,
        "nft": {"reward": "brightness", "group_size": 4, "prompts_per_round": 2, "num_steps": 4,
                "prompts": ["a cat", "a dog"], "adv_clip_max": 1.0, "kl_beta": 0.0, **nft},
        "train": {"max_steps": 6, "learning_rate": 0.1, "batch_size": 8, "checkpoint_every": 0, **(train or {})},
        "eval": {"reward": None}, "logging": {"report_to": []},
    })


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_a_few_rounds_raise_brightness_of_images_sampled_from_the_trained_lora(tmp_path, model):
    """Six rounds (one group of 8 images, one optimizer step each) of DiffusionNFT with the brightness reward; then a fresh
    policy with the final LoRA and the same policy with the LoRA off sample the same prompts and
    seeds (ODE): the trained LoRA's images are brighter."""
    from diffalign.pipelines.loading import load_policy
    from diffalign.rewards import load_reward
    from diffalign.training import sample_images

    # measured trained - base (seeds 5 / 6): tiny-flux +0.097 / +0.083, tiny-sd3 +0.123 / +0.112
    cfg = _config(tmp_path / "run", model, train={"max_steps": 6}, group_size=8, prompts_per_round=1)
    final = get_method("diffusion_nft")[1](cfg).train()
    policy = load_policy(model)
    lora.load_lora(policy.denoiser, final)
    reward, prompts = load_reward("brightness"), ["a cat", "a dog"]
    trained = reward(sample_images(policy, prompts, seed=5, num_steps=4, guidance_scale=1.0), prompts).mean().item()
    with policy.reference():
        base = reward(sample_images(policy, prompts, seed=5, num_steps=4, guidance_scale=1.0), prompts).mean().item()
    assert trained > base + 0.03, (base, trained)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 6 and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_resume_is_bitwise_with_the_old_adapter_inside_and_between_rounds(tmp_path):
    """Rounds of 8 images in 2 optimizer steps, 4 steps straight (checkpoint every step) vs resumed
    from step 2 (between rounds: the old adapter's EMA comes next) and from step 3 (inside a round):
    the same final LoRA and the same old adapter in the step-4 checkpoint, bit for bit."""
    trainer = get_method("diffusion_nft")[1]
    train = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 1, "learning_rate": 0.05}
    straight = trainer(_config(tmp_path / "a", train=train, kl_beta=1e-3)).train()
    ckpts = tmp_path / "a" / "checkpoints"
    extra = safetensors.torch.load_file(str(ckpts / "step-4" / "extra.safetensors"))
    theta = safetensors.torch.load_file(str(ckpts / "step-4" / "lora.safetensors"))
    assert extra and all(k.startswith(f"{OLD_ADAPTER}.") for k in extra)
    assert any(not torch.equal(v, theta[k.removeprefix(f"{OLD_ADAPTER}.")]) for k, v in extra.items())  # EMA, not a copy
    a = safetensors.torch.load_file(str(straight / lora.LORA_WEIGHT_NAME))
    for step in (2, 3):
        out = tmp_path / f"from-{step}"
        resumed = trainer(_config(out, train=train, resume=str(ckpts / f"step-{step}"), kl_beta=1e-3)).train()
        b = safetensors.torch.load_file(str(resumed / lora.LORA_WEIGHT_NAME))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        extra_b = safetensors.torch.load_file(str(out / "checkpoints" / "step-4" / "extra.safetensors"))
        assert all(torch.equal(extra[k], extra_b[k]) for k in extra), step


def test_config_and_family_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"nft\.prompts_per_round x nft\.group_size = 8 images per round is not a multiple"):
        _config(tmp_path, train={"batch_size": 3})
    with pytest.raises(UserError, match=r"^nft\.solver: dpm2 is the flow-model solver .* set nft\.solver=euler"):
        get_method("diffusion_nft")[1](_config(tmp_path / "sd", "tiny-sd")).train()


def test_epsilon_family_trains_with_the_euler_solver(tmp_path):
    """SD (epsilon prediction) has no dpm2 sampler here; with ``solver: euler`` (DDIM eta 0) the
    loss, written in x0 space, trains the LoRA there too."""
    final = get_method("diffusion_nft")[1](_config(tmp_path / "run", "tiny-sd", train={"max_steps": 2}, solver="euler")).train()
    weights = safetensors.torch.load_file(str(final / lora.LORA_WEIGHT_NAME))
    assert any(("lora.up" in k or "lora_B" in k) and v.abs().max() > 0 for k, v in weights.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["old_gap"] >= 0 for r in rows)


def test_init_lora_starts_both_the_trained_and_the_old_adapter_from_that_lora(tmp_path):
    """init_lora (the shared add-LoRA path): the first round samples from the continued LoRA, i.e.
    the old adapter saved at step 1 holds exactly that file's weights."""
    from diffalign.pipelines.loading import load_policy

    donor = load_policy("tiny-sd3")
    lora.add_lora(donor.denoiser, "sd3", LoraSettings(rank=4))
    with torch.no_grad():
        for k, p in lora.lora_parameters(donor.denoiser).items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))) * 0.1)
    init = lora.save_lora(donor.pipe, donor.denoiser, tmp_path / "init", LoraSettings(rank=4))
    cfg = _config(tmp_path / "run", train={"max_steps": 1, "checkpoint_every": 1}, init_lora=str(init))
    get_method("diffusion_nft")[1](cfg).train()
    extra = safetensors.torch.load_file(str(tmp_path / "run" / "checkpoints" / "step-1" / "extra.safetensors"))
    saved = lora.lora_state_dict(donor.denoiser)
    assert extra.keys() == {f"{OLD_ADAPTER}.{k}" for k in saved}
    assert all(torch.equal(extra[f"{OLD_ADAPTER}.{k}"], v) for k, v in saved.items())
