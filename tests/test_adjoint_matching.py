"""Adjoint Matching: loss numbers by hand, the lean adjoint against closed forms and against
backprop through the base chain, the memoryless schedule, the trainer on the tiny models, and a
real two-process run.

This file is also the two-process worker: ``accelerate launch ... tests/test_adjoint_matching.py OUT``.
"""

from __future__ import annotations

from conftest import run_two_processes
from two_process_checks import check_ranks_scored_their_own_images, check_two_process_run, train_recording_rank_outputs

import math
import sys
from pathlib import Path

import pytest
import torch

from diffalign.losses import adjoint_matching_loss
from diffalign.pipelines.adjoint import (
    base_step_mean,
    lean_adjoint,
    memoryless_flow_sigma,
    memoryless_noise_level,
    solve_lean_adjoint,
    step_dt,
)


@pytest.fixture
def tiny_policy():
    """Factory: ``tiny_policy("tiny-sd")`` -> a freshly loaded tiny policy (64 px, fp32, CPU)."""
    from diffalign.pipelines.loading import load_policy

    return lambda name: load_policy(name)


@pytest.fixture
def perturbed_lora():
    """Add a rank-4 LoRA with seeded weights (B non-zero) so the fine-tuned model differs from the base."""
    from diffalign import lora
    from diffalign.config import LoraSettings

    def add(policy, scale: float = 0.3):
        params = lora.add_lora(policy.denoiser, policy.family, LoraSettings(rank=4, init_lora_weights="gaussian"))
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in lora.lora_parameters(policy.denoiser).items():
                std = scale if "lora_B" in name else 0.25  # A too: peft's init would use the global RNG
                param.copy_(std * torch.randn(param.shape, generator=generator))
        return params

    return add


# --- the loss, by hand -----------------------------------------------------------------------


def _loss_inputs():
    fine_mean = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]], requires_grad=True)  # [2, 1, 1, 2]
    base_mean = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])
    std = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    adjoint = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.25]]]])
    return fine_mean, base_mean, std, adjoint


def test_adjoint_matching_loss_hand_numbers():
    """Per sample: control = (fine - base) / std, target = std * a, term = sum (control + target)^2.

    sample 0: control = (1, 1) / 0.5 = (2, 2); target = 0.5 * (1, -1) = (0.5, -0.5)
              term = 2.5^2 + 1.5^2 = 6.25 + 2.25 = 8.5; ||control||^2 = 8; ||target||^2 = 0.5
    sample 1: control = (0, 0); target = 2 * (0.5, 0.25) = (1, 0.5)
              term = 1 + 0.25 = 1.25; ||target||^2 = 1.25
    loss = (8.5 + 1.25) / 2 = 4.875; control_norm = 4; target_norm = 0.875
    d loss / d fine_mean = 2 (control + target) / std / B:
              sample 0: 2 * (2.5, 1.5) / 0.5 / 2 = (5, 3); sample 1: 2 * (1, 0.5) / 2 / 2 = (0.5, 0.25)
    """
    fine_mean, base_mean, std, adjoint = _loss_inputs()
    loss, metrics = adjoint_matching_loss(fine_mean, base_mean, std, adjoint)
    assert loss.item() == pytest.approx(4.875)
    assert float(metrics["loss"]) == pytest.approx(4.875)
    assert float(metrics["control_norm"]) == pytest.approx(4.0)
    assert float(metrics["target_norm"]) == pytest.approx(0.875)
    assert float(metrics["clip_frac"]) == 0.0
    loss.backward()
    assert torch.allclose(fine_mean.grad.flatten(), torch.tensor([5.0, 3.0, 0.5, 0.25]))


def test_adjoint_matching_loss_per_sample_clipping():
    """loss_clip = 5: sample 0's term 8.5 > 5 becomes the constant 5 (no gradient), sample 1 keeps 1.25.

    loss = (5 + 1.25) / 2 = 3.125; clip_frac = 1/2; gradient (0, 0) for sample 0, (0.5, 0.25) for sample 1.
    """
    fine_mean, base_mean, std, adjoint = _loss_inputs()
    loss, metrics = adjoint_matching_loss(fine_mean, base_mean, std, adjoint, loss_clip=5.0)
    assert loss.item() == pytest.approx(3.125)
    assert float(metrics["clip_frac"]) == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(fine_mean.grad.flatten(), torch.tensor([0.0, 0.0, 0.5, 0.25]))


def test_adjoint_matching_loss_zero_at_the_discrete_optimum():
    """One Gaussian step x1 ~ N(m(x0), s^2) and a linear reward r = c . x1 with multiplier lambda:
    the reward-tilted optimum p*(x1|x0) ∝ N(m(x0), s^2) exp(lambda c . x1) is N(m(x0) + lambda s^2 c, s^2).
    With the adjoint at the landing point a1 = -lambda c the loss is zero there:
    (lambda s^2 c) / s + s (-lambda c) = 0; at the base (fine = base) it is ||s lambda c||^2 = 0.09 * 4 * 5.
    """
    s, lam = 0.3, 2.0
    c = torch.tensor([1.0, -2.0]).reshape(1, 1, 1, 2)
    base = torch.tensor([0.4, 0.1]).reshape(1, 1, 1, 2)
    a1 = -lam * c
    loss, _ = adjoint_matching_loss(base + lam * s**2 * c, base, s, a1)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    loss, _ = adjoint_matching_loss(base, base, s, a1)
    assert loss.item() == pytest.approx(s**2 * lam**2 * 5.0)


def test_adjoint_matching_loss_rejects_deterministic_steps():
    fine_mean, base_mean, _, adjoint = _loss_inputs()
    with pytest.raises(ValueError, match="std > 0"):
        adjoint_matching_loss(fine_mean, base_mean, torch.zeros(2, 1, 1, 1), adjoint)


# --- the lean adjoint against closed forms -----------------------------------------------------


def test_lean_adjoint_linear_drift_matches_matrix_exponential():
    """Constant linear drift b(x) = A x, Euler steps mean_k(x) = x + dt A x on [0, 1].

    Lean adjoint ODE da/dt = -A^T a, a(1) given  =>  a(t) = expm(A^T (1 - t)) a(1).
    Discretely a_k = (I + dt A)^T a_{k+1}, so a_0 = ((I + dt A)^T)^T a_T exactly (T = 400 steps),
    and it converges to expm(A^T) a(1) with error O(dt).
    """
    torch.manual_seed(0)
    A = torch.tensor([[0.5, 1.0], [-0.3, 0.2]], dtype=torch.float64)
    num_steps, batch = 400, 3
    dt = 1.0 / num_steps
    latents = torch.randn(batch, num_steps + 1, 2, dtype=torch.float64)  # linear drift: any points
    a_final = torch.randn(batch, 2, dtype=torch.float64)

    adjoints, base_means = solve_lean_adjoint(lambda k, x: x + dt * x @ A.T.float(), latents.float(), a_final.float())

    step_matrix = torch.eye(2, dtype=torch.float64) + dt * A
    discrete = a_final @ torch.linalg.matrix_power(step_matrix, num_steps)  # row-vector form of (M^T)^T a
    closed = a_final @ torch.linalg.matrix_exp(A)  # a(0)^T = a(1)^T expm(A)
    assert torch.allclose(adjoints[:, 0].double(), discrete, rtol=1e-4, atol=1e-5)
    assert torch.allclose(adjoints[:, 0].double(), closed, rtol=5e-3, atol=5e-3)
    assert not torch.allclose(adjoints[:, 0].double(), a_final, atol=0.1)  # it did move
    assert torch.equal(adjoints[:, -1], a_final.float())
    assert torch.allclose(base_means[:, 7].double(), latents[:, 7] + dt * latents[:, 7] @ A.T, atol=1e-5)


def test_lean_adjoint_time_dependent_scalar_drift():
    """b(x, t) = 2 t x: da/dt = -2 t a  =>  a(t) = exp(1 - t^2) a(1). Check at t = 0, 0.5 and 1 with
    Euler steps mean_k(x) = x + dt * 2 t_k x on a uniform grid of T = 1000 steps."""
    num_steps = 1000
    dt = 1.0 / num_steps
    latents = torch.zeros(2, num_steps + 1, 1, 3)
    a_final = torch.tensor([[[1.0, -0.5, 2.0]], [[0.1, 0.2, 0.3]]])
    adjoints, _ = solve_lean_adjoint(lambda k, x: x + dt * 2 * (k * dt) * x, latents, a_final)
    for k in (0, num_steps // 2, num_steps):
        t = k * dt
        expected = math.exp(1 - t**2) * a_final
        assert torch.allclose(adjoints[:, k], expected, rtol=2e-3), (t, adjoints[:, k], expected)


# --- the memoryless schedule of the policies -----------------------------------------------------


def test_memoryless_flow_sigma_values_and_guard():
    """sigma(t) = sqrt(2 (1 - t) / t): t = 0.5 -> sqrt(2); t = 0.8 -> sqrt(0.5); t = 1 -> 0;
    t = 0 is clamped to t_min = 1e-3 -> sqrt(2 * 0.999 / 0.001) = sqrt(1998)."""
    sigma = memoryless_flow_sigma(torch.tensor([0.5, 0.8, 1.0, 0.0]))
    assert torch.allclose(sigma, torch.tensor([math.sqrt(2), math.sqrt(0.5), 0.0, math.sqrt(1998.0)]))
    assert memoryless_noise_level("flux") == pytest.approx(math.sqrt(2))
    assert memoryless_noise_level("sdxl") == 1.0
    assert memoryless_noise_level("sd3") == pytest.approx(math.sqrt(2))  # SD3 is a flow model too
    with pytest.raises(ValueError, match="unknown model family"):
        memoryless_noise_level("kandinsky")


def test_flow_sde_with_sqrt2_is_the_memoryless_schedule(tiny_policy):
    """On tiny-flux, with noise_level sqrt(2), every step but the first (whose sigma = 1 is capped)
    has diffusion std / sqrt(dt) = sigma(t) = sqrt(2 (1 - t) / t) and drift (mean - x) / dt = 2 v - x / t,
    where t = 1 - sigma and v = -(model velocity) points toward the data."""
    policy = tiny_policy("tiny-flux")
    cond = policy.encode_prompts(["a red cube", "a blue sky"])
    trajectory = policy.sample(cond, 4, noise_level=memoryless_noise_level("flux"), generator=torch.Generator().manual_seed(0))
    dts = step_dt(trajectory.timesteps, trajectory.next_timesteps)
    for k in range(1, 4):
        t = 1 - trajectory.timesteps[k].item() / 1000
        _, mean, std = policy.step_distribution(trajectory, k)
        x = trajectory.latents[:, k]
        assert std.flatten()[0].item() / dts[k].sqrt().item() == pytest.approx(memoryless_flow_sigma(t).item(), rel=1e-5)
        v = -policy.predict(x, trajectory.timesteps[k], cond)
        assert torch.allclose((mean - x) / dts[k], 2 * v - x / t, rtol=1e-4, atol=1e-4)
    # the guard: the first step's std is finite although sigma(0) is infinite
    _, _, std0 = policy.step_distribution(trajectory, 0)
    assert torch.isfinite(std0).all() and std0.flatten()[0].item() > 0


# --- the lean adjoint through a real policy: the base model, not the fine-tuned one ------------


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_lean_adjoint_uses_the_base_model(model, tiny_policy, perturbed_lora):
    """Along a deterministic chain sampled by the base model (LoRA off, noise 0), x_T is a function
    of x_0 and the lean adjoint a_0 must equal the backprop gradient d <a_T, x_T(x_0)> / d x_0
    through the *base* chain. The LoRA is perturbed so the fine-tuned model differs: the VJPs
    through the fine-tuned steps give a clearly different a_0, and the solver must not match it."""
    policy = tiny_policy(model)
    perturbed_lora(policy)
    cond = policy.encode_prompts(["a red cube", "a blue sky"])
    x0 = policy.initial_noise(2, 64, 64, torch.Generator().manual_seed(1))
    a_final = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))

    with torch.no_grad(), policy.reference():
        trajectory = policy.sample(cond, 3, noise_level=0.0, latents=x0, decode=False)
    adjoints, base_means = lean_adjoint(policy, trajectory, a_final)

    x0_leaf = x0.clone().requires_grad_(True)
    with policy.reference():
        backprop = policy.sample(cond, 3, noise_level=0.0, latents=x0_leaf, grad_steps=-1, decode=False)
    (expected,) = torch.autograd.grad((backprop.final_latents * a_final).sum(), x0_leaf)
    assert torch.allclose(adjoints[:, 0], expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(base_means, trajectory.latents[:, 1:], atol=1e-5)  # noise 0: mean = next latent

    def fine_step_mean(k, x):
        model_out = policy.predict(x, trajectory.timesteps[k], cond)
        return policy.step(model_out, x, trajectory.timesteps[k], trajectory.next_timesteps[k], 0.0,
                           timesteps=trajectory.timesteps, prev_sample=trajectory.latents[:, k + 1])[2]

    fine_adjoints, _ = solve_lean_adjoint(fine_step_mean, trajectory.latents, a_final)
    gap = (fine_adjoints[:, 0] - expected).norm() / expected.norm()
    assert gap > 1e-2, f"fine-tuned and base adjoints differ by only {gap:.2e}: the test cannot tell them apart"
    # the adapter is on again afterwards and still trainable
    assert all(p.requires_grad for n, p in policy.denoiser.named_parameters() if "lora_" in n)
    assert not torch.allclose(policy.predict(x0, trajectory.timesteps[0], cond),
                              _reference_predict(policy, x0, trajectory.timesteps[0], cond))
    assert base_step_mean(policy, trajectory)(0, x0).shape == x0.shape


def test_lean_adjoint_with_gradient_checkpointing_matches_without(tiny_policy, perturbed_lora):
    """train.gradient_checkpointing recomputes denoiser activations during the VJP's backward;
    the recomputation must run with the LoRA still off (it once raised CheckpointError)."""
    policy = tiny_policy("tiny-sd")
    perturbed_lora(policy)
    cond = policy.encode_prompts(["a red cube"])
    x0 = policy.initial_noise(1, 64, 64, torch.Generator().manual_seed(1))
    a_final = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trajectory = policy.sample(cond, 3, noise_level=1.0, latents=x0, decode=False,
                                   generator=torch.Generator().manual_seed(3))
    plain, _ = lean_adjoint(policy, trajectory, a_final)
    policy.denoiser.enable_gradient_checkpointing()
    try:
        checkpointed, _ = lean_adjoint(policy, trajectory, a_final)
        recomputed, _ = lean_adjoint(policy, trajectory, a_final, checkpoint=True)
    finally:
        policy.denoiser.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


def _reference_predict(policy, x, t, cond):
    with torch.no_grad(), policy.reference():
        return policy.predict(x, t, cond)


# --- the whole objective at the start of training -------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_first_gradient_is_the_pathwise_reward_gradient(model, tiny_policy):
    """At initialisation (LoRA B = 0, fine-tuned = base) the control is 0 and the lean adjoint is the
    exact backprop adjoint of the recorded chain, a_{k+1} = -lambda dr/dx_{k+1}. So summed over all
    steps, d loss / d theta = (2 / B) sum_k (std a_{k+1}) . d(mean_k / std) / d theta
    = -(2 lambda / B) d r / d theta, where r is the reward of the chain re-run with the same noise
    (x_{k+1} = mean_k(x_k) + recorded noise) and differentiated end to end. With lambda = 100, B = 2:
    the AM gradient is -100 x the pathwise reward gradient (cosine 1)."""
    from diffalign import lora
    from diffalign.config import LoraSettings
    from diffalign.rewards import load_reward
    from diffalign.trainers.adjoint_matching import terminal_adjoint

    policy = tiny_policy(model)
    params = lora.add_lora(policy.denoiser, policy.family, LoraSettings(rank=4))
    reward = load_reward("brightness")
    prompts, lam = ["a red cube", "a blue sky"], 100.0
    cond = policy.encode_prompts(prompts, with_uncond=True)
    with torch.no_grad():
        trajectory = policy.sample(cond, 4, guidance_scale=2.0, noise_level=memoryless_noise_level(policy.family),
                                   generator=torch.Generator().manual_seed(0), decode=False)
    a_final, _ = terminal_adjoint(policy, reward, trajectory.final_latents, prompts, lam)
    adjoints, base_means = lean_adjoint(policy, trajectory, a_final)
    for k in range(4):
        _, fine_mean, std = policy.step_distribution(trajectory, k)
        adjoint_matching_loss(fine_mean, base_means[:, k], std, adjoints[:, k + 1])[0].backward()
    am_grad = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None

    x = trajectory.latents[:, 0]
    for k in range(4):
        t = trajectory.timesteps[k]
        model_out = policy.predict(x, t, cond, 2.0)
        mean = policy.step(model_out, x, t, trajectory.next_timesteps[k], trajectory.noise_level,
                           timesteps=trajectory.timesteps, prev_sample=trajectory.latents[:, k + 1])[2]
        x = mean + (trajectory.latents[:, k + 1] - base_means[:, k])  # the recorded noise
    assert torch.allclose(x, trajectory.latents[:, -1], atol=1e-5)
    reward(policy.decode(x), prompts).sum().backward()
    reward_grad = torch.cat([p.grad.flatten() for p in params])
    assert reward_grad.abs().max() > 0
    assert torch.allclose(am_grad, -(2 * lam / len(prompts)) * reward_grad, rtol=1e-3, atol=1e-3 * am_grad.abs().max())


# --- config-time checks ----------------------------------------------------------------------------


def _am_config(tmp_path, model: str = "tiny-sd", **settings):
    return {
        "method": "adjoint_matching", "model": model, "output_dir": str(tmp_path / "run"), "seed": 0,
        "adjoint_matching": {"reward": "brightness", "num_steps": 4, "timesteps_per_trajectory": 4,
                             "reward_multiplier": 1e5, "prompts": ["a cat", "a dog"], **settings},
        "train": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 2, "checkpoint_every": 0},
        "lora": {"rank": 4},
        "eval": {"reward": "brightness", "prompts": ["a cat", "a dog"], "num_steps": 4, "num_images_per_prompt": 1},
    }


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"reward": "jpeg_compressibility"},
         r"^config error: adjoint_matching\.reward: reward 'jpeg_compressibility' is not differentiable; "
         r"adjoint_matching\.reward needs a differentiable reward"),
        ({"timesteps_per_trajectory": 9},
         r"^config error: adjoint_matching\.timesteps_per_trajectory: 9 is more than adjoint_matching\.num_steps \(4\)"),
    ],
)
def test_config_errors(tmp_path, monkeypatch, settings, message):
    from diffalign.config import load_config
    from diffalign.errors import UserError
    import diffalign.pipelines.loading as loading

    monkeypatch.setattr(loading, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=message):
        load_config(_am_config(tmp_path, **settings))


# --- the trainer on the tiny models ------------------------------------------------------------------


@pytest.mark.parametrize("model, lr, settings", [
    ("tiny-sd", 1e-2, {}),
    ("tiny-sdxl", 1e-2, {"loss_clip": 1e6}),
    ("tiny-flux", 5e-2, {}),
    ("tiny-sd3", 5e-2, {}),
])
def test_adjoint_matching_trainer_raises_brightness(tmp_path, model, lr, settings):
    """Four optimizer steps (lambda = 1e5, all 4 steps of each trajectory in the loss) raise the
    mean brightness of deterministic samples on fixed prompts and seeds and change the LoRA."""
    import json

    import safetensors.torch

    from diffalign.config import get_method, load_config
    from diffalign.lora import LORA_WEIGHT_NAME

    cfg = load_config(_am_config(tmp_path, model, **settings), [f"train.learning_rate={lr}"])
    _, trainer_cls = get_method("adjoint_matching")
    final = trainer_cls(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval/brightness"] for row in rows if "eval/brightness" in row]
    assert evals[-1] > evals[0] + 1e-3, evals
    train_rows = [row for row in rows if "loss" in row]
    assert len(train_rows) == 4
    assert train_rows[0]["control_norm"] == 0.0 and train_rows[-1]["control_norm"] > 0  # starts at the base
    assert all(row["target_norm"] > 0 for row in train_rows)
    weights = safetensors.torch.load_file(str(final / LORA_WEIGHT_NAME))
    assert any(("lora.up" in name or "lora_B" in name) and w.abs().max() > 0 for name, w in weights.items())


def test_loss_clipping_drops_outlier_terms(tmp_path):
    """With a clip far below every term, every (sample, step) term is clipped: clip_frac = 1 and the
    LoRA gets no gradient, so it stays at its zero-B initialisation."""
    import json

    import safetensors.torch

    from diffalign.config import get_method, load_config
    from diffalign.lora import LORA_WEIGHT_NAME

    base = _am_config(tmp_path, "tiny-sd", loss_clip=1e-12)
    base["eval"] = {"reward": None}
    cfg = load_config(base, ["train.max_steps=2"])
    final = get_method("adjoint_matching")[1](cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["clip_frac"] == 1.0 and row["grad_norm"] == 0.0 for row in rows)
    weights = safetensors.torch.load_file(str(final / LORA_WEIGHT_NAME))
    ups = [w for name, w in weights.items() if "lora.up" in name or "lora_B" in name]
    assert ups and all(w.abs().max() == 0 for w in ups)


# --- recipes -------------------------------------------------------------------------------------

# the recipes for the published models; the shapes world's (shapes-*.yaml, on the embedded models)
# are checked by tests/test_recipes_and_cli.py and the world's tests
RECIPES = sorted(p for p in (__import__("pathlib").Path(__file__).parents[1] / "configs" / "adjoint_matching").glob("*.yaml")
                 if not p.stem.startswith("shapes-"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_validate_and_document_themselves(path):
    """Each recipe loads as an AdjointMatchingConfig, names the real hub model of its family, and
    opens with a comment header: what it trains, hardware, launch command, override example."""
    from diffalign.config import load_config

    cfg = load_config(path)
    assert cfg.method == "adjoint_matching"
    expected = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "flux": "black-forest-labs/FLUX.1-dev"}
    assert cfg.model == expected[path.stem]
    header = path.read_text().split("\nmethod:")[0]
    assert all(line.startswith("#") or not line for line in header.splitlines())
    for needle in ("What it trains", "Hardware", "Launch:", "Override:", f"configs/adjoint_matching/{path.name}"):
        assert needle in header, needle


def test_there_is_a_recipe_per_family():
    assert [p.stem for p in RECIPES] == ["flux", "sd15", "sdxl"]


# --- two processes -------------------------------------------------------------------------------


def test_two_process_adjoint_matching_keeps_ranks_identical_and_only_rank0_writes(tmp_path):
    """Two gloo CPU processes on tiny-flux (memoryless flow SDE, 4 steps, loss on 2 random steps
    per trajectory): each rank samples its own trajectories (its own noise stream), the averaged
    gradients keep the LoRA identical on both ranks, and only rank 0 writes the run folder."""
    result = run_two_processes(__file__, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = check_two_process_run(tmp_path, steps=2, checkpoints=["step-1", "step-2"])
    assert "batch: 2 prompts per process x 2 processes x 1 accumulation steps = 4 prompts per optimizer step" in result.stdout
    # one reward call (a(1) at x1) per step on each rank, 2 images each; the ranks' images differ
    check_ranks_scored_their_own_images(rank0, rank1, [2, 2])


def _two_process_worker(out: Path) -> None:
    from diffalign.config import load_config
    from diffalign.trainers.adjoint_matching import AdjointMatchingTrainer

    config = _am_config(out, "tiny-flux", reward="recorded_brightness", timesteps_per_trajectory=2)
    config["eval"] = {"reward": None}
    overrides = ["train.max_steps=2", "train.checkpoint_every=1", "train.learning_rate=5e-2"]
    train_recording_rank_outputs(out, AdjointMatchingTrainer, lambda: load_config(config, overrides))

if __name__ == "__main__":
    _two_process_worker(Path(sys.argv[1]))


# --- reference options: loss_reduction, adjoint_guidance, empty_prompt_fraction --------------------


def _one_step_metrics(tmp_path, name: str, **settings) -> dict:
    """Metrics of one optimizer step on tiny-sd (no clipping, no eval), same seed every time."""
    import json

    from diffalign.config import get_method, load_config

    data = _am_config(tmp_path / name, "tiny-sd", **settings)
    data["eval"] = {"reward": None}
    data["train"].update({"max_steps": 1, "max_grad_norm": None})
    get_method("adjoint_matching")[1](load_config(data)).train()
    return json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[0])


def test_loss_reduction_mean_is_the_sum_over_k_divided_by_k(tmp_path):
    """Official: the mean over batch x K regressed steps. With K = 4 steps of the same samples,
    'sum' gives exactly 4x the loss and 4x the gradient norm of 'mean' (same noise, same steps;
    the LoRA starts at B = 0, so the first gradient does not depend on the learning rate)."""
    mean = _one_step_metrics(tmp_path, "mean", empty_prompt_fraction=0.0)
    total = _one_step_metrics(tmp_path, "sum", empty_prompt_fraction=0.0, loss_reduction="sum")
    assert total["loss"] == pytest.approx(4 * mean["loss"], rel=1e-5)
    assert total["grad_norm"] == pytest.approx(4 * mean["grad_norm"], rel=1e-4)
    assert total["reward"] == mean["reward"]  # the same samples


def test_adjoint_guidance_changes_only_a_guided_run(tmp_path):
    """Guidance shapes only the samples by default (official); adjoint_guidance: true also guides
    the lean adjoint through the base drift: with guidance 3 the same samples get a different
    adjoint (target_norm) and gradient."""
    common = {"empty_prompt_fraction": 0.0}
    off3 = _one_step_metrics(tmp_path, "off3", guidance_scale=3.0, **common)
    on3 = _one_step_metrics(tmp_path, "on3", guidance_scale=3.0, adjoint_guidance=True, **common)
    assert off3["reward"] == on3["reward"]  # guided sampling either way: the same images
    # (on the random tiny UNet the conditional and unconditional drifts differ little: ~0.04 %)
    assert off3["target_norm"] != on3["target_norm"] and off3["grad_norm"] != on3["grad_norm"]


def test_empty_prompt_fraction_draws_whole_empty_batches():
    """One draw per batch: over 2000 seeded batches the share of all-empty batches is 0.2 within
    3 standard errors (sqrt(0.2 * 0.8 / 2000) = 0.009); fraction 0 never empties a batch."""
    from diffalign.trainers.adjoint_matching import prompts_or_empty

    g = torch.Generator().manual_seed(0)
    batches = [prompts_or_empty(["a cat", "a dog"], 0.2, g) for _ in range(2000)]
    assert all(b in (["a cat", "a dog"], ["", ""]) for b in batches)
    assert sum(b == ["", ""] for b in batches) / 2000 == pytest.approx(0.2, abs=0.027)
    assert all(prompts_or_empty(["a"], 0.0, g) == ["a"] for _ in range(200))
