"""Sampler step maths (pipelines/samplers.py) and policy sampling with log-probabilities.

Step level: each step function against the diffusers scheduler it mirrors, the final-alpha DDIM
step, the log-probability at and around the mean, recomputation of a recorded transition.
Policy level, on every tiny family: zero-noise sampling equals the stock pipeline, recorded
log-probs equal their recomputation (with CFG), the same-noise group option, and the reference
(LoRA disabled) scoring differently from the policy once the LoRA is non-zero.
"""

from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from diffalign.pipelines.samplers import (
    ddim_step_with_logprob,
    flow_cps_step_with_logprob,
    flow_ode_step,
    flow_sde_std,
    flow_sde_step_with_logprob,
    gaussian_log_prob,
    predicted_x0_and_eps,
)

FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-flux"]
STEP_FAMILIES = FAMILIES + ["tiny-sd3"]  # the SDE window / CPS tests cover every family
RES = 64  # pixels, the tiny models' size
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _ddim_scheduler(prediction_type: str = "epsilon", set_alpha_to_one: bool = False):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=set_alpha_to_one, steps_offset=1, prediction_type=prediction_type,
    )


def _alphas(scheduler, t: int, num_steps: int) -> tuple[float, float]:
    prev = t - scheduler.config.num_train_timesteps // num_steps
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    return a_t, a_prev


# --- Gaussian log-density ------------------------------------------------------------------------


def test_gaussian_log_prob_matches_hand_computation():
    """x = [[0, 1, 3]] (one sample, 3 elements), mean = [[0, 0, 1]], std = 2.

    log N(x; m, 4) = -(x - m)^2 / 8 - log 2 - log sqrt(2 pi) per element:
        elements: -0/8, -1/8, -4/8  ->  mean of -(x-m)^2/8 = -(0 + 0.125 + 0.5) / 3 = -0.2083333
        total = -0.2083333 - 0.6931472 - 0.9189385 = -1.8204190
    """
    x = torch.tensor([[0.0, 1.0, 3.0]])
    mean = torch.tensor([[0.0, 0.0, 1.0]])
    value = gaussian_log_prob(x, mean, torch.tensor(2.0))
    assert value.shape == (1,)
    assert value.item() == pytest.approx(-1.8204190, abs=1e-6)


def test_log_prob_is_per_sample_mean_over_chw():
    """The log-prob of a [B, C, H, W] sample is the mean (not the sum) of per-element densities,
    so it does not grow with the image size: 4x4 and 8x8 latents at the mean score the same."""
    std = torch.tensor(0.5)
    small = gaussian_log_prob(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), std)
    large = gaussian_log_prob(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), std)
    expected = -math.log(0.5) - LOG_SQRT_2PI
    assert torch.allclose(small, torch.full((2,), expected))
    assert torch.allclose(large, small)


# --- DDIM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [751, 1])  # t = 1 is the last step: it lands past 0, on final_alpha_cumprod
def test_ddim_eta0_equals_diffusers_step(prediction_type, t):
    scheduler = _ddim_scheduler(prediction_type)
    scheduler.set_timesteps(4)
    assert t in scheduler.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    sample, model_out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    expected = scheduler.step(model_out, t, sample, eta=0.0).prev_sample
    a_t, a_prev = _alphas(scheduler, t, 4)
    prev, log_prob, mean, std = ddim_step_with_logprob(model_out, sample, a_t, a_prev, eta=0.0,
                                                       prediction_type=prediction_type)
    torch.testing.assert_close(prev, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-5)
    assert float(std) == 0.0
    assert torch.equal(log_prob, torch.zeros(2))  # a deterministic step reports log-prob 0


@pytest.mark.parametrize("t", [501, 1])
def test_ddim_eta_positive_mean_and_noise_match_diffusers(t):
    """With eta > 0, diffusers' step with variance_noise = 0 is our mean, and with variance_noise z
    it is mean + std * z; our std is eta * sqrt(variance) from the scheduler's own _get_variance."""
    eta = 0.7
    scheduler = _ddim_scheduler()
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(1)
    sample, model_out, z = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    a_t, a_prev = _alphas(scheduler, t, 4)
    _, _, mean, std = ddim_step_with_logprob(model_out, sample, a_t, a_prev, eta=eta)

    at_mean = scheduler.step(model_out, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    torch.testing.assert_close(mean, at_mean, rtol=0, atol=1e-5)
    noisy = scheduler.step(model_out, t, sample, eta=eta, variance_noise=z).prev_sample
    torch.testing.assert_close(mean + std * z, noisy, rtol=0, atol=1e-5)
    prev_t = t - 1000 // 4
    expected_std = eta * float(scheduler._get_variance(torch.tensor(t), torch.tensor(prev_t))) ** 0.5
    assert float(std) == pytest.approx(expected_std, rel=1e-5)
    assert float(std) > 0


def test_ddim_final_step_uses_final_alpha():
    """The step from the last timestep lands on final_alpha_cumprod: 1.0 with set_alpha_to_one
    (then the DDPM variance (1 - 1)/(1 - a_t) * (1 - a_t) is 0 and the step is deterministic even
    with eta = 1), alphas_cumprod[0] otherwise."""
    for set_alpha_to_one, expect_zero_std in [(True, True), (False, False)]:
        scheduler = _ddim_scheduler(set_alpha_to_one=set_alpha_to_one)
        scheduler.set_timesteps(4)
        t = int(scheduler.timesteps[-1])
        gen = torch.Generator().manual_seed(2)
        sample, model_out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        a_t, a_prev = _alphas(scheduler, t, 4)
        assert a_prev == float(scheduler.final_alpha_cumprod)
        _, _, mean, std = ddim_step_with_logprob(model_out, sample, a_t, a_prev, eta=1.0)
        zeros = torch.zeros_like(sample)
        torch.testing.assert_close(mean, scheduler.step(model_out, t, sample, eta=1.0, variance_noise=zeros).prev_sample,
                                   rtol=0, atol=1e-5)
        assert (float(std) == 0.0) == expect_zero_std


def test_predicted_x0_inverts_the_forward_process():
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps; with the true eps (epsilon) or the true
    v = sqrt(a) eps - sqrt(1 - a) x0 (v_prediction) the recovered x0 and eps are exact."""
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    a = 0.3
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    for prediction_type, output in [("epsilon", eps), ("v_prediction", a**0.5 * eps - (1 - a) ** 0.5 * x0)]:
        got_x0, got_eps = predicted_x0_and_eps(output, x_t, a, prediction_type)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        predicted_x0_and_eps(eps, x_t, a, "sample")


def test_ddim_recorded_transition_log_prob_recomputes_and_peaks_at_mean():
    gen = torch.Generator().manual_seed(4)
    sample, model_out = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    alpha_t, alpha_prev = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.4, 0.7, 0.9])  # per-sample [B]
    prev, log_prob, mean, std = ddim_step_with_logprob(
        model_out, sample, alpha_t, alpha_prev, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert std.shape == (3, 1, 1, 1)
    _, again, _, _ = ddim_step_with_logprob(model_out, sample, alpha_t, alpha_prev, eta=1.0, prev_sample=prev)
    torch.testing.assert_close(again, log_prob, rtol=0, atol=1e-6)

    _, at_mean, _, _ = ddim_step_with_logprob(model_out, sample, alpha_t, alpha_prev, eta=1.0, prev_sample=mean)
    torch.testing.assert_close(at_mean, -torch.log(std.flatten()) - LOG_SQRT_2PI)
    for scale in (0.01, 0.5, 2.0):
        moved = mean + scale * std * torch.randn(mean.shape, generator=gen)
        _, off_mean, _, _ = ddim_step_with_logprob(model_out, sample, alpha_t, alpha_prev, eta=1.0, prev_sample=moved)
        assert (off_mean < at_mean).all()


# --- flow matching ---------------------------------------------------------------------------


def _flux_scheduler(num_steps: int = 4):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=0.8)
    return scheduler


def test_flow_ode_step_equals_diffusers_euler_step():
    scheduler = _flux_scheduler()
    gen = torch.Generator().manual_seed(6)
    x, v = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    for i in range(4):
        t = scheduler.timesteps[i]
        expected = scheduler.step(v, t, x, return_dict=False)[0]  # advances the scheduler's step index
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        torch.testing.assert_close(flow_ode_step(v, x, sigma, sigma_next), expected, rtol=0, atol=1e-6)
        # noise_level 0: the SDE step is the ODE step, deterministic, log-prob 0
        prev, log_prob, mean, std = flow_sde_step_with_logprob(v, x, sigma, sigma_next, 0.0, sigma_max=scheduler.sigmas[1])
        torch.testing.assert_close(prev, expected, rtol=0, atol=1e-6)
        assert torch.equal(log_prob, torch.zeros(2))


def test_flow_sde_std_formula_and_sigma_one_guard():
    """std(sigma) = a sqrt(sigma / (1 - sigma)): a = 0.7, sigma = 0.5 -> 0.7; sigma = 0.8 -> 0.7 * 2 = 1.4.
    At sigma = 1 the reference (Flow-GRPO sd3_sde_with_logprob.py, Pref-GRPO grpo/steps.py) guards
    only the denominator: sqrt(1 / (1 - 0.8)) * 0.7 = 0.7 * 2.2360680 = 1.5652476. Adjoint
    Matching's memoryless cap also caps the numerator: 0.7 * sqrt(0.8 / 0.2) = 1.4."""
    assert flow_sde_std(0.5, 0.7, sigma_max=0.9).item() == pytest.approx(0.7)
    assert flow_sde_std(0.8, 0.7, sigma_max=0.9).item() == pytest.approx(1.4)
    assert flow_sde_std(1.0, 0.7, sigma_max=0.8).item() == pytest.approx(1.5652476)
    assert flow_sde_std(1.0, 0.7, sigma_max=0.8, memoryless_cap=True).item() == pytest.approx(1.4)
    assert flow_sde_std(0.5, 0.7, sigma_max=0.3, memoryless_cap=True).item() == pytest.approx(0.7 * math.sqrt(0.3 / 0.7))
    x, v = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    prev, log_prob, mean, std = flow_sde_step_with_logprob(v, x, 1.0, 0.75, 0.7, sigma_max=0.8)
    assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()


def test_flux_first_step_std_is_the_reference_a_at_512px_six_steps():
    """FLUX at 512 px with 6 steps (issue 10 item 2): the schedule starts at sigma = 1 and its second
    sigma is sigma_1 = 0.903736 (linspace(1, 1/6, 6) shifted by mu = 0.63). The reference's step 0
    has g = a / sqrt(1 - sigma_1) and dt = sigma_1 - 1, so std = g sqrt(-dt) = a = 0.7 exactly; the
    memoryless cap gives a sqrt(sigma_1) = 0.7 * 0.950650 = 0.665455."""
    from diffalign.pipelines.loading import load_policy

    policy = load_policy("tiny-flux")
    timesteps, next_timesteps = policy.schedule(6, 512, 512)
    assert timesteps[1].item() / 1000 == pytest.approx(0.903736, abs=1e-5)
    x = torch.randn(1, 16, 4, 4)
    for sde_type, expected in (("sde", 0.7), ("memoryless", 0.7 * math.sqrt(0.903736))):
        kwargs = {} if sde_type == "sde" else {"sde_type": sde_type}
        _, _, _, std = policy.step(torch.zeros_like(x), x, timesteps[0], next_timesteps[0], 0.7, timesteps, **kwargs)
        assert float(std) == pytest.approx(expected, abs=1e-5)


def test_memoryless_cap_makes_the_first_step_mean_independent_of_the_start():
    """With a = sqrt(2) at sigma = 1 -> sigma_1 = 0.8 and the exact velocity v = x - m (m = E[x0]):
    capped, g^2 = 2 * 0.8 / 0.2 = 8 and mean = x + (v + 4 x) (-0.2) = 0.2 (x - v) = 0.2 m for every
    x; the reference guard (g^2 = 10) gives mean = x + (v + 5 x)(-0.2) = -0.2 (x - m), which
    follows the start. This is why Adjoint Matching keeps its cap."""
    m = torch.full((1, 1, 1, 1), 0.5)
    for x_value in (-1.0, 2.0):
        x = torch.full((1, 1, 1, 1), x_value)
        _, _, capped, _ = flow_sde_step_with_logprob(x - m, x, 1.0, 0.8, math.sqrt(2), 0.8, memoryless_cap=True)
        _, _, reference, _ = flow_sde_step_with_logprob(x - m, x, 1.0, 0.8, math.sqrt(2), 0.8)
        assert capped.item() == pytest.approx(0.2 * 0.5, abs=1e-6)
        assert reference.item() == pytest.approx(-0.2 * (x_value - 0.5), abs=1e-6)


# --- coefficients-preserving sampling (CPS) -----------------------------------------------------


def test_cps_step_by_hand_and_zero_noise_is_the_ode_step():
    """One element, x = 1, v = 2, sigma = 0.5 -> 0.25, a = 0.5 (Flow-GRPO's cps branch):
        std  = 0.25 sin(pi / 4) = 0.1767767
        x0   = x - sigma v = 0,  eps = x + (1 - sigma) v = 2
        mean = 0.75 * 0 + sqrt(0.0625 - 0.03125) * 2 = 0.3535534
    With a = 0: std 0 and mean = 0.75 x0 + 0.25 eps = 0.5 = x + (0.25 - 0.5) v, the Euler ODE step;
    log-prob 0. The last step (sigma_next = 0) is deterministic whatever a."""
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    _, _, mean, std = flow_cps_step_with_logprob(v, x, 0.5, 0.25, 0.5)
    assert float(std) == pytest.approx(0.1767767, abs=1e-6) and mean.item() == pytest.approx(0.3535534, abs=1e-6)
    gen = torch.Generator().manual_seed(3)
    xs, vs = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    prev, log_prob, _, std = flow_cps_step_with_logprob(vs, xs, 0.7, 0.4, 0.0, generator=gen)
    torch.testing.assert_close(prev, flow_ode_step(vs, xs, 0.7, 0.4), rtol=0, atol=1e-6)
    assert torch.equal(log_prob, torch.zeros(2)) and float(std) == 0.0
    prev, log_prob, _, _ = flow_cps_step_with_logprob(vs, xs, 0.2, 0.0, 0.8, generator=gen)
    torch.testing.assert_close(prev, flow_ode_step(vs, xs, 0.2, 0.0), rtol=0, atol=1e-6)
    assert torch.equal(log_prob, torch.zeros(2))


def test_cps_keeps_the_marginal_coefficients_on_a_1d_gaussian_toy():
    """1-D toy: data x0 ~ N(1.5, 0.3^2), x_s = (1 - s) x0 + s eps at s = 0.6, and the conditional
    velocity v = eps - x0 (the model is exact for that pair). A CPS step to s' = 0.35 with a = 0.7
    gives x' = (1 - s') x0 + sqrt(s'^2 - std^2) eps + std z, so x' - 0.65 x0 has mean 0 and variance
    s'^2 = 0.1225 exactly (closed form) and x' ~ N(0.65 * 1.5, 0.65^2 * 0.09 + 0.1225) = N(0.975,
    0.160525): the forward marginal at s'. Flow-GRPO's SDE step with the same a does not keep them
    (its noise variance at s' is 0.1431 here)."""
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    x0 = 1.5 + 0.3 * torch.randn(n, 1, 1, 1, generator=gen)
    eps = torch.randn(n, 1, 1, 1, generator=gen)
    s, s_next, a = 0.6, 0.35, 0.7
    x = (1 - s) * x0 + s * eps
    prev, _, mean, std = flow_cps_step_with_logprob(eps - x0, x, s, s_next, a, generator=gen)
    # closed form, sample by sample: mean = 0.65 x0 + sqrt(s'^2 - std^2) eps
    c = math.sqrt(s_next**2 - float(std) ** 2)
    torch.testing.assert_close(mean, (1 - s_next) * x0 + c * eps, rtol=0, atol=1e-6)
    assert c**2 + float(std) ** 2 == pytest.approx(s_next**2, abs=1e-7)
    assert prev.mean().item() == pytest.approx(0.975, abs=5e-3)
    assert prev.var().item() == pytest.approx(0.160525, abs=3e-3)
    assert (prev - (1 - s_next) * x0).var().item() == pytest.approx(s_next**2, abs=2e-3)
    sde_prev, _, _, _ = flow_sde_step_with_logprob(eps - x0, x, s, s_next, a, 0.9, generator=gen)
    assert abs((sde_prev - (1 - s_next) * x0).var().item() - s_next**2) > 1e-2


def test_flow_sde_mean_and_std_match_hand_computation():
    """One element, x = 1, v = 2, sigma = 0.5 -> 0.25 (dt = -0.25), a = 0.7:
        g = 0.7 * sqrt(0.5 / 0.5) = 0.7,  g^2 = 0.49
        mean = x + [v + g^2 / (2 sigma) (x + (1 - sigma) v)] dt
             = 1 + [2 + 0.49 / 1.0 * (1 + 0.5 * 2)] * (-0.25) = 1 + (2 + 0.98) * (-0.25) = 0.255
        std  = g sqrt(-dt) = 0.7 * 0.5 = 0.35
    """
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    _, _, mean, std = flow_sde_step_with_logprob(v, x, 0.5, 0.25, 0.7, sigma_max=0.9)
    assert mean.item() == pytest.approx(0.255, abs=1e-6)
    assert float(std) == pytest.approx(0.35, abs=1e-6)


def test_flow_sde_recorded_transition_log_prob_recomputes_and_peaks_at_mean():
    gen = torch.Generator().manual_seed(7)
    x, v = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    prev, log_prob, mean, std = flow_sde_step_with_logprob(
        v, x, 0.8, 0.6, 0.7, sigma_max=0.9, generator=torch.Generator().manual_seed(8))
    _, again, _, _ = flow_sde_step_with_logprob(v, x, 0.8, 0.6, 0.7, sigma_max=0.9, prev_sample=prev)
    torch.testing.assert_close(again, log_prob, rtol=0, atol=1e-6)
    _, at_mean, _, _ = flow_sde_step_with_logprob(v, x, 0.8, 0.6, 0.7, sigma_max=0.9, prev_sample=mean)
    torch.testing.assert_close(at_mean, torch.full((2,), -math.log(float(std)) - LOG_SQRT_2PI))
    assert (log_prob < at_mean).all()
    # the sample really is distributed N(mean, std^2): its standardised residual has unit variance
    residual = (prev - mean) / std
    assert residual.std().item() == pytest.approx(1.0, abs=0.15)


# --- policies on the tiny families ------------------------------------------------------------


@pytest.fixture(scope="module")
def policies():
    from diffalign.pipelines.loading import load_policy

    torch.manual_seed(0)
    return {name: load_policy(name) for name in STEP_FAMILIES}


def _noise_level(name: str) -> float:
    return 0.7 if name in ("tiny-flux", "tiny-sd3") else 1.0


def _cond(policy, prompts, name):
    # SD/SDXL: CFG against the empty prompt; FLUX, SD3: true CFG against a negative prompt.
    if name in ("tiny-flux", "tiny-sd3"):
        return policy.encode_prompts(prompts, negative_prompts=["blurry"] * len(prompts))
    # SDXL's time ids carry the target size; SD ignores height/width
    return policy.encode_prompts(prompts, with_uncond=True, height=RES, width=RES)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_noise_sample_equals_stock_pipeline(policies, name):
    policy = policies[name]
    prompts = ["a red cube", "a blue sphere"]
    latents = policy.initial_noise(2, RES, RES, torch.Generator().manual_seed(0))
    if name == "tiny-flux":
        cond = policy.encode_prompts(prompts)
        traj = policy.sample(cond, 4, guidance_scale=1.0, noise_level=0.0, latents=latents, height=RES, width=RES,
                             decode=False)
        packed = policy.pipe._pack_latents(latents, 2, *latents.shape[1:])
        out = policy.pipe(prompts, num_inference_steps=4, guidance_scale=policy.embedded_guidance, height=RES,
                          width=RES, latents=packed, output_type="latent", max_sequence_length=32).images
        expected = policy.pipe._unpack_latents(out, RES, RES, policy.pipe.vae_scale_factor)
    else:
        cond = _cond(policy, prompts, name)
        traj = policy.sample(cond, 4, guidance_scale=3.0, noise_level=0.0, latents=latents, height=RES, width=RES,
                             decode=False)
        expected = policy.pipe(prompts, num_inference_steps=4, guidance_scale=3.0, eta=0.0, latents=latents,
                               height=RES, width=RES, output_type="latent").images
    torch.testing.assert_close(traj.final_latents, expected.float(), rtol=0, atol=1e-5)
    assert torch.equal(traj.log_probs, torch.zeros(2, 4))


@pytest.mark.parametrize("name", FAMILIES)
def test_trajectory_shapes_and_recorded_log_probs_recompute(policies, name):
    policy = policies[name]
    cond = _cond(policy, ["a red cube", "a blue sphere"], name)
    traj = policy.sample(cond, 3, guidance_scale=3.0, noise_level=_noise_level(name),
                         generator=torch.Generator().manual_seed(1), height=RES, width=RES)
    assert traj.latents.shape == (2, 4, *policy.latent_shape(RES, RES))  # [B, T+1, C, h, w]
    assert traj.log_probs.shape == (2, 3) and traj.timesteps.shape == (3,)
    assert traj.images.shape == (2, 3, RES, RES)
    assert 0.0 <= traj.images.min().item() and traj.images.max().item() <= 1.0
    assert (traj.log_probs != 0).all()  # every step stochastic
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(policy.log_prob(traj, step), traj.log_probs[:, step], rtol=0, atol=1e-5)
        # the recomputation uses the sampling-time guidance: without CFG the transition scores differently
        # (the tiny FLUX barely reacts to its negative prompt, hence a small but clear margin)
        unguided = dataclasses.replace(traj, guidance_scale=1.0)
        assert (policy.log_prob(unguided, 1) - traj.log_probs[:, 1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_same_noise_groups(policies, name):
    policy = policies[name]
    noise = policy.initial_noise(4, RES, RES, torch.Generator().manual_seed(2), group_size=2)
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3])
    assert not torch.equal(noise[0], noise[2])
    with pytest.raises(ValueError, match="multiple of group_size"):
        policy.initial_noise(3, RES, RES, group_size=2)
    # one start, two different chains: the per-step noise differs within a group
    cond = _cond(policy, ["a red cube"] * 2, name)
    traj = policy.sample(cond, 2, guidance_scale=3.0, noise_level=_noise_level(name), latents=noise[:2],
                         generator=torch.Generator().manual_seed(3), height=RES, width=RES, decode=False)
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])
    assert not torch.allclose(traj.latents[0, -1], traj.latents[1, -1])


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_log_prob_differs_once_lora_is_nonzero(name):
    from diffalign.config import LoraSettings
    from diffalign.lora import add_lora
    from diffalign.pipelines.loading import load_policy

    policy = load_policy(name)  # a fresh copy: the LoRA must not leak into the shared fixture
    family = policy.family
    params = add_lora(policy.denoiser, family, LoraSettings(rank=4))
    cond = _cond(policy, ["a red cube", "a blue sphere"], name)
    traj = policy.sample(cond, 2, guidance_scale=3.0, noise_level=_noise_level(name),
                         generator=torch.Generator().manual_seed(4), height=RES, width=RES, decode=False)
    with torch.no_grad():
        policy_lp = policy.log_prob(traj, 0)
        with policy.reference():
            ref_lp = policy.log_prob(traj, 0)
    torch.testing.assert_close(ref_lp, policy_lp, rtol=0, atol=1e-6)  # B = 0 at init: LoRA is a no-op

    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        policy_lp = policy.log_prob(traj, 1)
        with policy.reference():
            ref_lp = policy.log_prob(traj, 1)
        again = policy.log_prob(traj, 1)  # the adapter is back on after the context
    assert (policy_lp - ref_lp).abs().min().item() > 1e-3  # measured: >= 0.013 on every family
    torch.testing.assert_close(again, policy_lp, rtol=0, atol=0)

    # gradients of a recomputed log-prob reach the LoRA weights only
    lp = policy.log_prob(traj, 1)
    lp.sum().backward()
    assert all(p.grad is not None for p in params)
    assert sum(p.grad.abs().sum().item() for p in params) > 0


# --- SDE window and step types on the policies -------------------------------------------------


@pytest.mark.parametrize("name", STEP_FAMILIES)
def test_sde_window_steps_outside_are_the_deterministic_steps(policies, name):
    """An SDE window (1, 3) of 4 steps: steps 0 and 3 run the deterministic step (their log-probs
    are 0 and the chain there equals a zero-noise chain's step from the same latents), steps 1 and
    2 are stochastic; the recorded log-probs recompute, also with per-chain step indices."""
    policy = policies[name]
    cond = _cond(policy, ["a red cube", "a blue sphere"], name)
    latents = policy.initial_noise(2, RES, RES, torch.Generator().manual_seed(5))
    traj = policy.sample(cond, 4, guidance_scale=3.0, noise_level=_noise_level(name), latents=latents,
                         generator=torch.Generator().manual_seed(6), height=RES, width=RES, decode=False,
                         sde_window=(1, 3))
    assert traj.sde_window == (1, 3) and [traj.noise_level_at(k) for k in range(4)] == [0.0, _noise_level(name), _noise_level(name), 0.0]
    assert torch.equal(traj.log_probs[:, [0, 3]], torch.zeros(2, 2)) and (traj.log_probs[:, 1:3] != 0).all()
    ode = policy.sample(cond, 4, guidance_scale=3.0, noise_level=0.0, latents=latents, height=RES, width=RES,
                        decode=False)
    torch.testing.assert_close(traj.latents[:, 1], ode.latents[:, 1], rtol=0, atol=1e-6)
    with torch.no_grad():
        for step in range(4):
            torch.testing.assert_close(policy.log_prob(traj, step), traj.log_probs[:, step], rtol=0, atol=1e-5)
        per_chain = policy.log_prob(traj, torch.tensor([2, 1]))
        torch.testing.assert_close(per_chain, torch.stack([traj.log_probs[0, 2], traj.log_probs[1, 1]]), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="share one noise level"):
            policy.log_prob(traj, torch.tensor([0, 1]))


@pytest.mark.parametrize("name", STEP_FAMILIES)
def test_cps_sampling_recomputes_and_is_flow_only(policies, name):
    policy = policies[name]
    cond = _cond(policy, ["a red cube", "a blue sphere"], name)
    if policy.prediction_type != "flow":
        with pytest.raises(ValueError, match="sde_type 'cps' is not available for the"):
            policy.sample(cond, 2, noise_level=1.0, sde_type="cps", height=RES, width=RES, decode=False)
        return
    latents = policy.initial_noise(2, RES, RES, torch.Generator().manual_seed(7))
    traj = policy.sample(cond, 3, guidance_scale=3.0, noise_level=0.8, latents=latents, sde_type="cps",
                         generator=torch.Generator().manual_seed(8), height=RES, width=RES, decode=False)
    assert traj.sde_type == "cps" and (traj.log_probs[:, :-1] != 0).all()
    assert torch.equal(traj.log_probs[:, -1], torch.zeros(2))  # lands on sigma = 0: deterministic
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(policy.log_prob(traj, step), traj.log_probs[:, step], rtol=0, atol=1e-5)
    zero = policy.sample(cond, 3, guidance_scale=3.0, noise_level=0.0, latents=latents, sde_type="cps",
                         height=RES, width=RES, decode=False)
    ode = policy.sample(cond, 3, guidance_scale=3.0, noise_level=0.0, latents=latents, height=RES, width=RES,
                        decode=False)
    torch.testing.assert_close(zero.final_latents, ode.final_latents, rtol=0, atol=1e-5)
