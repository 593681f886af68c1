"""DRaFT: the loss by hand, differentiable sampling (truncation, checkpointing, finite differences),
the config-time reward check, the trainer on the tiny models, and a real two-process run.

This file is also the two-process worker: ``accelerate launch ... tests/test_draft.py OUT``.
"""

from __future__ import annotations

from conftest import run_two_processes
from two_process_checks import check_ranks_scored_their_own_images, check_two_process_run, train_recording_rank_outputs

import sys
from pathlib import Path

import pytest
import torch

from diffalign.losses import draft_loss


@pytest.fixture
def tiny_policy():
    """Factory: ``tiny_policy("tiny-sd")`` -> a freshly loaded tiny policy (64 px, fp32, CPU)."""
    from diffalign.pipelines.loading import load_policy

    return lambda name: load_policy(name)


def _perturbed_lora(policy, scale: float = 0.1) -> list[torch.nn.Parameter]:
    """A rank-4 LoRA with seeded weights (B non-zero), so its gradients and the outputs are non-trivial."""
    from diffalign import lora
    from diffalign.config import LoraSettings

    params = lora.add_lora(policy.denoiser, policy.family, LoraSettings(rank=4, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in lora.lora_parameters(policy.denoiser).items():
            std = scale if "lora_B" in name else 0.25  # A too: peft's init would use the global RNG
            param.copy_(std * torch.randn(param.shape, generator=generator))
    return params


# --- the loss, by hand -----------------------------------------------------------------------


def test_draft_loss_hand_numbers():
    """rewards (0.2, 0.6), reward_scale 2: loss = -2 * mean = -2 * 0.4 = -0.8;
    reward std (unbiased) = sqrt(((0.2-0.4)^2 + (0.6-0.4)^2) / 1) = sqrt(0.08) = 0.28284;
    d loss / d r_i = -2 / 2 = -1."""
    rewards = torch.tensor([0.2, 0.6], requires_grad=True)
    loss, metrics = draft_loss(rewards, reward_scale=2.0)
    assert loss.item() == pytest.approx(-0.8)
    assert float(metrics["reward"]) == pytest.approx(0.4)
    assert float(metrics["reward_std"]) == pytest.approx(0.08**0.5)
    loss.backward()
    assert torch.allclose(rewards.grad, torch.tensor([-1.0, -1.0]))


def test_draft_loss_lv_averages_the_renoised_copies_first():
    """DRaFT-LV rewards [B=2, n=2] = [[0.1, 0.3], [0.5, 0.9]]: per-sample means (0.2, 0.7), loss =
    -0.45, reward std = sqrt((0.25^2 * 2) / 1) = 0.35355; each entry's gradient -1 / (B n) = -0.25."""
    rewards = torch.tensor([[0.1, 0.3], [0.5, 0.9]], requires_grad=True)
    loss, metrics = draft_loss(rewards)
    assert loss.item() == pytest.approx(-0.45)
    assert float(metrics["reward"]) == pytest.approx(0.45)
    assert float(metrics["reward_std"]) == pytest.approx(0.125**0.5)
    loss.backward()
    assert torch.allclose(rewards.grad, torch.full((2, 2), -0.25))


# --- differentiable sampling in the policy -----------------------------------------------------


def _per_step_offsets(policy) -> tuple[dict[int, torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """A forward hook that adds a zero scalar (requiring grad) to the denoiser output, one per
    timestep: its gradient says whether that step's denoiser call is on the gradient path."""
    offsets: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        key = round(float(torch.as_tensor(t).flatten()[0]) * (1000 if policy.family == "flux" else 1))
        offset = offsets.setdefault(key, torch.zeros((), requires_grad=True))
        return (output[0] + offset, *output[1:])

    return offsets, policy.denoiser.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("grad_steps", [1, 2, -1])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncation_stops_gradients_before_step_T_minus_K(tiny_policy, grad_steps, checkpoint):
    """3 DDIM steps with CFG: the offsets of the first T - K denoiser calls get no gradient, the
    last K (all for K = -1) get a non-zero one; the reward flows through the differentiable decode."""
    policy = tiny_policy("tiny-sd")
    cond = policy.encode_prompts(["a red cube", "a blue sky"], with_uncond=True)
    offsets, handle = _per_step_offsets(policy)
    try:
        trajectory = policy.sample(cond, 3, guidance_scale=3.0, noise_level=0.0,
                                   generator=torch.Generator().manual_seed(0), grad_steps=grad_steps, checkpoint=checkpoint)
        trajectory.images.mean().backward()
    finally:
        handle.remove()
    order = [int(t) for t in trajectory.timesteps]
    num_grad = 3 if grad_steps < 0 else grad_steps
    for i, t in enumerate(order):
        grad = offsets[t].grad
        if i < 3 - num_grad:
            assert grad is None or grad.item() == 0.0, f"step {i} (t={t}) is before the cutoff but has gradient {grad}"
        else:
            assert grad is not None and abs(grad.item()) > 1e-8, f"step {i} (t={t}) has no gradient"


def test_checkpointed_gradients_equal_plain_gradients(tiny_policy):
    """Recomputing each denoiser call in backward changes memory, not the gradient of the LoRA."""
    policy = tiny_policy("tiny-sdxl")
    params = _perturbed_lora(policy)
    cond = policy.encode_prompts(["a red cube", "a blue sky"], with_uncond=True)
    x0 = policy.initial_noise(2, 64, 64, torch.Generator().manual_seed(1))
    grads = []
    for checkpoint in (False, True):
        for p in params:
            p.grad = None
        trajectory = policy.sample(cond, 3, guidance_scale=2.0, noise_level=0.0, latents=x0, grad_steps=-1, checkpoint=checkpoint)
        trajectory.images.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_full_backprop_gradient_matches_finite_differences(tiny_policy):
    """DRaFT with K = all on tiny-sd (3 DDIM steps, CFG 2, decode): the directional derivative of
    r(theta) = mean(w * images) along a random LoRA direction d, by autograd, equals the central
    difference (r(theta + h d) - r(theta - h d)) / 2h with h = 1e-3 (measured error ~0.1%; the
    reward has zero-mean weights w so fp32 round-off stays small). K = 1 gives a different number
    (the truncated gradient), so the check can tell full from truncated backprop."""
    policy = tiny_policy("tiny-sd")
    params = _perturbed_lora(policy)
    cond = policy.encode_prompts(["a red cube", "a blue sky"], with_uncond=True)
    generator = torch.Generator().manual_seed(4)
    x0 = policy.initial_noise(2, 64, 64, generator)
    weights = torch.randn(2, 3, 64, 64, generator=generator)
    direction = [torch.randn(p.shape, generator=generator) for p in params]

    def reward(grad_steps: int) -> torch.Tensor:
        images = policy.sample(cond, 3, guidance_scale=2.0, noise_level=0.0, latents=x0, grad_steps=grad_steps).images
        return (images * weights).mean()

    def directional(grad_steps: int) -> float:
        for p in params:
            p.grad = None
        reward(grad_steps).backward()
        return sum((p.grad * d).sum() for p, d in zip(params, direction)).item()

    full, truncated = directional(-1), directional(1)
    h = 1e-3
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = reward(0).item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = reward(0).item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    finite_difference = (plus - minus) / (2 * h)
    assert abs(finite_difference) > 1e-5
    assert full == pytest.approx(finite_difference, rel=0.01)
    assert abs(truncated - finite_difference) > 0.5 * abs(finite_difference)


def _trainer(tmp_path, **draft):
    from diffalign.config import load_config
    from diffalign.trainers.draft import DraftTrainer

    return DraftTrainer(load_config(_draft_config(tmp_path, **draft)))


def test_lv_differentiates_only_the_renoised_last_step(tiny_policy, tmp_path):
    """DRaFT-LV with n = 2: B * n images (the n copies of a sample differ: independent re-noising),
    and of all denoiser calls only the re-run last timestep is on the gradient path."""
    policy = tiny_policy("tiny-sd")
    trainer = _trainer(tmp_path, lv_samples=2, guidance_scale=3.0)
    offsets, handle = _per_step_offsets(policy)
    try:
        images, prompts, mean_k = trainer.sample_images(policy, ["a cat", "a dog"], torch.Generator().manual_seed(0))
        images.mean().backward()
    finally:
        handle.remove()
    assert images.shape == (4, 3, 64, 64) and prompts == ["a cat", "a cat", "a dog", "a dog"] and mean_k == 1.0
    assert not torch.allclose(images[0], images[1])
    timesteps = sorted(offsets)
    assert offsets[timesteps[0]].grad is not None and offsets[timesteps[0]].grad.item() != 0.0  # t = 1: the last step
    assert all(offsets[t].grad is None for t in timesteps[1:])


def test_random_truncation_cuts_each_trajectory_at_its_own_step(tiny_policy, tmp_path):
    """Chains with cutoffs (1, 3) sampled together give each image the LoRA gradient of sampling it
    alone with grad_steps 1 and 3 (all) respectively; the two gradients differ."""
    policy = tiny_policy("tiny-sd")
    params = _perturbed_lora(policy)
    trainer = _trainer(tmp_path, k="all", random_truncation=True)
    cond = policy.encode_prompts(["a red cube", "a blue sky"], with_uncond=True)
    latents = policy.initial_noise(2, 64, 64, torch.Generator().manual_seed(1))

    def lora_grad(images_fn) -> torch.Tensor:
        for p in params:
            p.grad = None
        images_fn().mean().backward()
        return torch.cat([p.grad.flatten() for p in params])

    together = [lora_grad(lambda: trainer.sample_with_grad(policy, cond, latents, torch.tensor([1, 3]), 2.0, None)[row])
                for row in (0, 1)]
    alone = [lora_grad(lambda: policy.sample(cond.select([row]), 3, guidance_scale=2.0, noise_level=0.0,
                                             latents=latents[row : row + 1], grad_steps=k).images[0])
             for row, k in ((0, 1), (1, -1))]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(together[0], together[1], rtol=0.1)
    draws = trainer.truncation_steps(1000, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2, 3}


# --- config-time checks ------------------------------------------------------------------------


def _draft_config(tmp_path, model: str = "tiny-sd", **draft):
    return {
        "method": "draft", "model": model, "output_dir": str(tmp_path / "run"), "seed": 0,
        "draft": {"reward": "brightness", "num_steps": 3, "prompts": ["a cat", "a dog"], **draft},
        "train": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 2, "checkpoint_every": 0},
        "lora": {"rank": 4},
        "eval": {"reward": "brightness", "prompts": ["a cat", "a dog"], "num_steps": 3, "num_images_per_prompt": 1},
    }


@pytest.mark.parametrize(
    "draft, message",
    [
        ({"reward": "jpeg_compressibility"},
         r"^config error: draft\.reward: reward 'jpeg_compressibility' is not differentiable; draft\.reward needs a differentiable reward \(e\.g\. .*brightness"),
        ({"reward": {"composite": {"brightness": 1.0, "jpeg_compressibility": 0.1}}},
         r"^config error: draft\.reward: reward 'composite' is not differentiable"),
        ({"reward": "brightnes"}, r"^config error: draft\.reward: unknown reward 'brightnes' \(did you mean 'brightness'\?\)"),
        ({"k": 5}, r"^config error: draft\.k: 5 is more than draft\.num_steps \(3\); use k: all"),
        ({"k": 0}, r"^config error: draft\.k: must be >= 1 or 'all', got 0"),
        ({"k": 2, "lv_samples": 2}, r"^config error: draft\.lv_samples: DRaFT-LV .* needs draft\.k=1 \(got k=2\)"),
        ({"random_truncation": True}, r"^config error: draft\.random_truncation: draws K from 1\.\.draft\.k, so it needs k > 1"),
    ],
)
def test_config_errors_are_one_line_before_any_model_loads(tmp_path, monkeypatch, draft, message):
    """Bad DRaFT settings fail in load_config, with the key, the value and the fix on one line;
    loading a model there would be a bug, so load_policy is made to explode."""
    from diffalign.config import load_config
    from diffalign.errors import UserError
    import diffalign.pipelines.loading as loading

    monkeypatch.setattr(loading, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=message) as info:
        load_config(_draft_config(tmp_path, **draft))
    assert "\n" not in str(info.value)


def test_config_accepts_k_all_and_composite_of_differentiable_rewards(tmp_path):
    from diffalign.config import load_config

    cfg = load_config(_draft_config(tmp_path, k="all", random_truncation=True,
                                    reward={"composite": {"brightness": 1.0, "saturation": 0.5}}))
    assert cfg.draft.max_grad_steps() == 3 and cfg.draft.random_truncation


# --- the trainer on the tiny models --------------------------------------------------------------


def _eval_rewards(run_dir) -> tuple[float, float]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval/brightness"] for row in rows if "eval/brightness" in row]
    return evals[0], evals[-1]


@pytest.mark.parametrize(
    "model, draft, lr",
    [
        ("tiny-sd", {"k": "all"}, 1e-2),                                               # DRaFT-K, full backprop
        ("tiny-sdxl", {"lv_samples": 2}, 1e-2),                                        # DRaFT-LV
        ("tiny-flux", {"k": "all", "random_truncation": True,                          # AlignProp-style K, composite
                       "reward": {"composite": {"brightness": 1.0, "target_color:color=[1,1,1]": 0.5}}}, 5e-2),
        ("tiny-sd3", {"k": 2}, 5e-2),                                                  # DRaFT-K, last 2 steps
    ],
)
def test_draft_trainer_raises_brightness(tmp_path, model, draft, lr):
    """Four optimizer steps raise the mean brightness of deterministic samples on fixed prompts and
    seeds (the trainer's eval before/after), change the LoRA, and write a loadable final LoRA."""
    import json

    from diffalign.config import get_method, load_config
    from diffalign.lora import LORA_WEIGHT_NAME

    cfg = load_config(_draft_config(tmp_path, model, **draft), [f"train.learning_rate={lr}"])
    _, trainer_cls = get_method("draft")
    final = trainer_cls(cfg).train()
    before, after = _eval_rewards(tmp_path / "run")
    assert after > before + 1e-3, (before, after)
    assert (final / LORA_WEIGHT_NAME).is_file()
    import safetensors.torch

    weights = safetensors.torch.load_file(str(final / LORA_WEIGHT_NAME))
    assert any(("lora.up" in name or "lora_B" in name) and w.abs().max() > 0 for name, w in weights.items())  # B (up) starts at zero
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert len(train_rows) == 4 and all(row["loss"] == pytest.approx(-row["reward"]) for row in train_rows)
    if draft.get("random_truncation"):
        assert any(row["k"] != 3 for row in train_rows)  # K really varies between trajectories


def test_draft_resume_continues_exactly(tmp_path):
    """2 steps in one go == 1 step, checkpoint, resume, 1 more step (LoRA bit-exact): the prompt
    and noise generators are part of the checkpoint."""
    import safetensors.torch

    from diffalign.config import get_method, load_config
    from diffalign.lora import LORA_WEIGHT_NAME

    _, trainer_cls = get_method("draft")
    base = _draft_config(tmp_path, "tiny-sd", k=2)
    base["eval"] = {"reward": None}
    straight = load_config(base, ["train.max_steps=2", f"output_dir={tmp_path / 'a'}"])
    first = load_config(base, ["train.max_steps=2", "train.checkpoint_every=1", f"output_dir={tmp_path / 'b'}"])
    weights_a = safetensors.torch.load_file(str(trainer_cls(straight).train() / LORA_WEIGHT_NAME))
    trainer_cls(first).train()
    # drop the second step and continue from the first checkpoint
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-2")
    resumed = load_config(base, ["train.max_steps=2", "train.checkpoint_every=1", f"output_dir={tmp_path / 'b'}",
                                 f"resume={tmp_path / 'b' / 'checkpoints' / 'step-1'}"])
    weights_b = safetensors.torch.load_file(str(trainer_cls(resumed).train() / LORA_WEIGHT_NAME))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# --- recipes -------------------------------------------------------------------------------------

# the recipes for the published models; the shapes world's (shapes-*.yaml, on the embedded models)
# are checked by tests/test_recipes_and_cli.py and the world's tests
RECIPES = sorted(p for p in (__import__("pathlib").Path(__file__).parents[1] / "configs" / "draft").glob("*.yaml")
                 if not p.stem.startswith("shapes-"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_validate_and_document_themselves(path):
    """Each recipe loads as a DraftConfig, names the real hub model of its family, and opens with a
    comment header that says what it trains, the hardware, the launch and an override example."""
    from diffalign.config import load_config

    cfg = load_config(path)
    assert cfg.method == "draft"
    expected = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "flux": "black-forest-labs/FLUX.1-dev"}
    assert cfg.model == expected[path.stem]
    header = path.read_text().split("\nmethod:")[0]
    assert all(line.startswith("#") or not line for line in header.splitlines())
    for needle in ("What it trains", "Hardware", "Launch:", "Override:", f"configs/draft/{path.name}"):
        assert needle in header, needle


def test_there_is_a_recipe_per_family():
    assert [p.stem for p in RECIPES] == ["flux", "sd15", "sdxl"]


# --- two processes -------------------------------------------------------------------------------


def test_two_process_draft_keeps_ranks_identical_and_only_rank0_writes(tmp_path):
    """Two gloo CPU processes, DRaFT-K (K = 2 of 3 steps) on tiny-sdxl: each rank samples its own
    images (its own noise stream), the averaged gradients keep the LoRA identical on both ranks,
    and only rank 0 writes the run folder."""
    result = run_two_processes(__file__, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = check_two_process_run(tmp_path, steps=2, checkpoints=["step-1", "step-2"])
    assert "batch: 2 prompts per process x 2 processes x 1 accumulation steps = 4 prompts per optimizer step" in result.stdout
    # one reward call per step on each rank, 2 images each; the ranks' images differ
    check_ranks_scored_their_own_images(rank0, rank1, [2, 2])


def _two_process_worker(out: Path) -> None:
    from diffalign.config import load_config
    from diffalign.trainers.draft import DraftTrainer

    config = _draft_config(out, "tiny-sdxl", reward="recorded_brightness", k=2)
    config["eval"] = {"reward": None}
    overrides = ["train.max_steps=2", "train.checkpoint_every=1"]
    train_recording_rank_outputs(out, DraftTrainer, lambda: load_config(config, overrides))

if __name__ == "__main__":
    _two_process_worker(Path(sys.argv[1]))
