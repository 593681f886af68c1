"""Diffusion-DPO: the loss against hand numbers, training on every tiny family, exact resume, the
stock-diffusers round trip of a trained run, and a real two-process run.

This file is also the two-process worker: ``accelerate launch ... tests/test_dpo.py OUT``.
"""

from __future__ import annotations

from conftest import run_two_processes

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffalign import lora
from diffalign.config import load_config
from diffalign.errors import UserError
from diffalign.losses import diffusion_dpo_loss, per_sample_mse, sft_loss

FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-sd3"]


# --- the loss ----------------------------------------------------------------------------------


def test_dpo_loss_matches_hand_numbers():
    """err_w=0.1, err_l=0.3, ref_err_w=0.2, ref_err_l=0.2, beta=10:
    inside = -0.5*10*((0.1-0.3) - (0.2-0.2)) = -5*(-0.2) = 1.0
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326...
    Second pair: err_w=0.3, err_l=0.1, same reference -> inside = -1, loss = log(1 + e) = 1.31326."""
    loss, metrics = diffusion_dpo_loss(
        torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2]), beta=10.0
    )
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert float(metrics["implicit_acc"]) == 0.5
    assert float(metrics["reward_margin"]) == pytest.approx(0.0, abs=1e-6)


def test_dpo_loss_sign_rewards_lowering_the_winner_error():
    """A policy that lowers the winner's error more than the reference does -> loss < log 2;
    equal to the reference -> exactly log 2; the opposite -> above log 2."""
    ref_w, ref_l = torch.tensor([0.5]), torch.tensor([0.5])
    better, _ = diffusion_dpo_loss(torch.tensor([0.4]), torch.tensor([0.5]), ref_w, ref_l, beta=5000.0)
    same, m_same = diffusion_dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=5000.0)
    worse, _ = diffusion_dpo_loss(torch.tensor([0.5]), torch.tensor([0.4]), ref_w, ref_l, beta=5000.0)
    assert better.item() < math.log(2) < worse.item()
    assert same.item() == pytest.approx(math.log(2))
    assert float(m_same["implicit_acc"]) == 0.0  # inside == 0 is not counted as correct


def test_sft_loss_and_per_sample_mse():
    """per-sample MSE of [[1,3]] vs [[0,0]] = (1 + 9)/2 = 5; sft = mean of the winners' errors."""
    assert per_sample_mse(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)).tolist() == [5.0]
    loss, metrics = sft_loss(torch.tensor([1.0, 3.0]))
    assert loss.item() == 2.0 and float(metrics["loss"]) == 2.0


# --- training on the tiny models ---------------------------------------------------------------


def dpo_config(out: Path, model: str = "tiny-sdxl", **overrides):
    data = {
        "method": "diffusion_dpo",
        "model": model,
        "output_dir": str(out),
        "seed": 0,
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 4, "learning_rate": 1e-3, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 1},
        "dpo": {"beta": 500.0},
        "data": {"source": "builtin:brightness"},
        "logging": {"sample_every": 0},
    }
    return load_config(data, [f"{k}={v}" for k, v in overrides.items()])


def _trainer_and_policy(cfg):
    from diffalign.pipelines.loading import load_policy
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    trainer = DiffusionDPOTrainer(cfg)
    policy = load_policy(cfg.model)
    params = lora.add_lora(policy.denoiser, policy.family, cfg.lora)
    return trainer, policy, params


def _fixed_batch():
    from diffalign.data import collate_pairs, open_preference_pairs

    pairs = open_preference_pairs("builtin:brightness")
    return collate_pairs(pairs, [0, 1, 2, 3], 64, seed=0, epoch=0)


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "sft"])
def test_dpo_steps_change_the_lora_and_lower_the_loss_on_a_fixed_batch(tmp_path, model, loss_type):
    cfg = dpo_config(tmp_path, model, **{"dpo.loss": loss_type})
    trainer, policy, params = _trainer_and_policy(cfg)
    batch = _fixed_batch()
    before_weights = [p.detach().clone() for p in params]

    def loss_on_batch():
        with torch.no_grad():
            return trainer.dpo_step(policy, batch, torch.Generator().manual_seed(0))[0].item()

    first = loss_on_batch()
    if loss_type == "sigmoid":
        assert first == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at zero: policy == reference
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for _ in range(5):
        loss, _ = trainer.dpo_step(policy, batch, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss_on_batch() < first
    assert any(not torch.equal(a, b) for a, b in zip(before_weights, params))


def test_loading_threads_do_not_change_training(tmp_path):
    """data.num_workers=2 (the default: the coming batches are loaded in threads, crossing an
    epoch of the built-in set) trains bitwise the same LoRA as loading in the loop."""
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    finals = [
        DiffusionDPOTrainer(dpo_config(tmp_path / f"w{workers}", "tiny-sd", **{
            "data.num_workers": workers, "data.max_samples": 12, "train.max_steps": 8,
            "train.gradient_accumulation_steps": 2, "train.checkpoint_every": 0})).train()
        for workers in (0, 2)
    ]
    a, b = _lora_tensors(finals[0]), _lora_tensors(finals[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_negative_dpo_is_dpo_on_swapped_pairs(tmp_path):
    from diffalign.data import PairBatch

    cfg = dpo_config(tmp_path, "tiny-sd")
    trainer, policy, params = _trainer_and_policy(cfg)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    batch = _fixed_batch()
    half = len(batch.prompts)
    swapped = PairBatch(batch.prompts, batch.rejected, batch.chosen,
                        batch.original_sizes[half:] + batch.original_sizes[:half],
                        batch.crops_top_left[half:] + batch.crops_top_left[:half])
    plain, _ = trainer.dpo_step(policy, swapped, torch.Generator().manual_seed(3))
    trainer.cfg = dpo_config(tmp_path, "tiny-sd", **{"dpo.negative": "true"})
    negative, _ = trainer.dpo_step(policy, batch, torch.Generator().manual_seed(3))
    assert negative.item() == pytest.approx(plain.item(), rel=1e-6)
    assert negative.item() != pytest.approx(math.log(2), abs=1e-4)


def _lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_resume_gives_bitwise_identical_lora(tmp_path):
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    straight = DiffusionDPOTrainer(dpo_config(tmp_path / "straight")).train()
    DiffusionDPOTrainer(dpo_config(tmp_path / "split", **{"train.max_steps": 2})).train()
    resumed = DiffusionDPOTrainer(dpo_config(tmp_path / "split", resume="latest")).train()
    a, b = _lora_tensors(straight), _lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("model", FAMILIES)
def test_trained_lora_loads_into_a_stock_pipeline_with_identical_images(tmp_path, model):
    """The user flow: train -> final/ -> a plain diffusers pipeline's load_lora_weights gives
    exactly the images the trained policy gives (alpha = 2 x rank, so alpha must travel)."""
    from diffusers import DiffusionPipeline

    from diffalign.pipelines.loading import load_policy, pipeline_call_defaults
    from diffalign.pipelines.tiny import tiny_model_dir
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = dpo_config(tmp_path / "run", model, **{"train.max_steps": 2, "train.learning_rate": 1e-2})
    final = DiffusionDPOTrainer(cfg).train()
    assert lora.read_lora_metadata(final)["alpha"] in ("8", "8.0", 8, 8.0)

    policy = load_policy(model)
    lora.load_lora(policy.denoiser, final)
    guidance = 1.0 if model == "tiny-flux" else 3.0
    cond = policy.encode_prompts(["a red cat"], with_uncond=guidance != 1.0)
    generator = torch.Generator().manual_seed(0)
    latents = policy.initial_noise(1, 64, 64, generator)
    with torch.no_grad():
        ours = policy.sample(cond, 4, guidance_scale=guidance, noise_level=0.0, latents=latents).images
        with policy.reference():
            base = policy.sample(cond, 4, guidance_scale=guidance, noise_level=0.0, latents=latents).images

    pipe = DiffusionPipeline.from_pretrained(tiny_model_dir(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(final))
    kwargs = pipeline_call_defaults(model)
    if model == "tiny-flux":
        kwargs["latents"] = pipe._pack_latents(latents, 1, *latents.shape[1:])
    else:
        kwargs["latents"] = latents
    stock = pipe("a red cat", num_inference_steps=4, guidance_scale=guidance if model != "tiny-flux" else 3.5,
                 output_type="pt", **kwargs).images
    assert (ours - base).abs().max() > 1e-4  # the LoRA changed the images, so the check can fail
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)


def test_run_dir_layout_and_refusal_to_overwrite(tmp_path):
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = dpo_config(tmp_path / "run", "tiny-sd", **{"data.eval_pairs": 4, "logging.sample_every": 2,
                                                        "logging.sample_steps": 2})
    DiffusionDPOTrainer(cfg).train()
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "final" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (run / "samples" / "step-000002.png").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "implicit_acc", "reward_margin", "grad_norm", "lr"} <= metrics[1].keys()
    assert metrics[0]["step"] == 0 and metrics[0]["eval/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "eval/pref_acc" in metrics[-1]
    with pytest.raises(UserError, match="exists and is not empty"):
        DiffusionDPOTrainer(cfg).train()
    assert load_config(str(run / "config.yaml")).dpo.beta == 500.0  # the resolved config reloads


# --- two processes -------------------------------------------------------------------------------


def test_two_process_dpo_keeps_ranks_identical_and_only_rank0_writes(tmp_path):
    result = run_two_processes(__file__, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = safetensors.torch.load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = safetensors.torch.load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # one writer, no duplicates
    saved = _lora_tensors(run / "final")
    assert len(saved) == len(rank0)
    assert "batch: 2 pairs per process x 2 processes" in result.stdout


def _two_process_worker(out: Path) -> None:
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = dpo_config(out / "run", "tiny-sd")
    trainer = DiffusionDPOTrainer(cfg)
    trainer.train()
    rank = int(os.environ["RANK"])
    state = lora.lora_state_dict(trainer.policy.denoiser)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    _two_process_worker(Path(sys.argv[1]))


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    """A NaN gradient must never reach the LoRA: with no skips allowed, optimizer_step raises
    and leaves the weights (and the gradients are dropped)."""
    from diffalign.run import Run
    from diffalign.training import build_optimization, optimizer_step

    cfg = dpo_config(tmp_path / "run", "tiny-sd")
    run = Run(cfg)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer, scheduler = build_optimization(cfg, [param])
    param.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(UserError, match="gradient norm is nan .*not applied.*train.skip_nonfinite_updates"):
        optimizer_step(run, [param], optimizer, scheduler, cfg.train)
    assert torch.equal(param.detach(), torch.ones(3)) and param.grad is None
    run.finish()


def test_non_finite_updates_are_skipped_up_to_the_limit_in_a_row(tmp_path):
    """skip_nonfinite_updates=2: two bad norms in a row are skipped (weights untouched, schedule
    not advanced), a finite one resets the count, and a third in a row stops the run."""
    from diffalign.run import Run
    from diffalign.training import build_optimization, optimizer_step

    cfg = dpo_config(tmp_path / "run", "tiny-sd", **{"train.skip_nonfinite_updates": 2, "train.warmup_steps": 0})
    run = Run(cfg)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer, scheduler = build_optimization(cfg, [param])

    def step_with(grad):
        param.grad = torch.tensor(grad)
        return optimizer_step(run, [param], optimizer, scheduler, cfg.train)

    nan, inf = float("nan"), float("inf")
    assert step_with([nan, 0.0, 0.0]) == {"skipped_updates": 1.0}
    assert step_with([inf, 0.0, 0.0]) == {"skipped_updates": 2.0}
    assert torch.equal(param.detach(), torch.ones(3)) and scheduler.last_epoch == 0
    assert step_with([3.0, 4.0, 0.0]) == {"grad_norm": 5.0}  # applied: the count in a row starts again
    moved = param.detach().clone()
    assert not torch.equal(moved, torch.ones(3)) and scheduler.last_epoch == 1
    assert step_with([nan, 0.0, 0.0]) == {"skipped_updates": 3.0}
    assert step_with([nan, 0.0, 0.0]) == {"skipped_updates": 4.0}
    with pytest.raises(UserError, match="gradient norm is nan .*2 skipped in a row"):
        step_with([nan, 0.0, 0.0])
    assert torch.equal(param.detach(), moved)
    run.finish()


def _poison_update(monkeypatch, step: int, value: float) -> list:
    """Make the first LoRA gradient element ``value`` just before the all-reduce of update
    ``step`` (counted from now); returns the call counter (append to it to shift the count)."""
    import diffalign.training as training

    real_sync, calls = training.sync_gradients, []

    def poisoned(params, accelerator):
        calls.append(1)
        if len(calls) == step:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = value
        real_sync(params, accelerator)

    monkeypatch.setattr(training, "sync_gradients", poisoned)
    return calls


def test_a_training_run_skips_a_poisoned_update_and_logs_it(tmp_path, monkeypatch):
    """End to end: step 2's gradients are made NaN after backward; the run goes on, metrics.jsonl
    marks the skipped update, and the final LoRA is finite."""
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    _poison_update(monkeypatch, 2, float("nan"))
    out = tmp_path / "run"
    cfg = dpo_config(out, "tiny-sd", **{"train.max_steps": 3, "train.skip_nonfinite_updates": 1})
    final = DiffusionDPOTrainer(cfg).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert by_step[2]["skipped_updates"] == 1.0 and "grad_norm" not in by_step[2]
    assert by_step[1]["grad_norm"] > 0 and by_step[3]["grad_norm"] > 0
    assert all(torch.isfinite(t).all() for t in _lora_tensors(final).values())


def test_fp16_scales_the_loss_halves_the_scale_on_overflow_and_resumes_it(tmp_path, monkeypatch):
    """mixed_precision=fp16 trains through a loss scale: step 2's gradients are made inf after
    backward, so that update is skipped and the scale halves (65536 -> 32768) without counting
    as a non-finite update (skip_nonfinite_updates=0 would stop); the step-2 checkpoint keeps
    the scale, and resuming from it gives the straight run's LoRA bitwise."""
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    calls = _poison_update(monkeypatch, 2, float("inf"))
    overrides = {"train.max_steps": 3, "train.mixed_precision": "fp16", "train.checkpoint_every": 2}
    straight = DiffusionDPOTrainer(dpo_config(tmp_path / "straight", "tiny-sd", **overrides)).train()
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    scales = [by_step[s]["loss_scale"] for s in (1, 2, 3)]
    assert scales[0] <= 65536.0 and scales[1] == scales[0] / 2 and scales[2] == scales[1]  # (beta 500 may
    assert "grad_norm" not in by_step[2] and "skipped_updates" not in by_step[2]  # overflow step 1 too)
    assert by_step[3]["grad_norm"] > 0
    state = json.loads((tmp_path / "straight" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == scales[1]

    calls.extend([1, 1])  # the resumed run's one step (3) is not made to overflow
    run_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-3")
    resumed = DiffusionDPOTrainer(dpo_config(run_dir, "tiny-sd", resume="latest", **overrides)).train()
    a, b = _lora_tensors(straight), _lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["step"] == 3 and last["loss_scale"] == scales[2]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "sft"])
def test_every_recipe_trains_with_each_loss_and_evaluates_held_out_pairs(tmp_path, family, loss_type):
    """configs/diffusion_dpo/<family>.yaml with ``dpo.loss`` = each option, shrunk to the tiny
    model: the start and end evaluations on held-out pairs (data.eval_pairs, as the recipes set)
    log preference accuracy, DPO loss and the denoising loss. (SFT used to crash there.)"""
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    tiny = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}[family]
    cfg = load_config(Path(__file__).parents[1] / "configs" / "diffusion_dpo" / f"{family}.yaml", [
        f"model={tiny}", f"output_dir={tmp_path}", f"dpo.loss={loss_type}", "data.source=builtin:brightness",
        "data.eval_pairs=2", "data.max_samples=6", "train.max_steps=1", "train.batch_size=1",
        "train.gradient_accumulation_steps=1", "train.resolution=null", "train.mixed_precision=no",
        "logging.report_to=none", "logging.sample_every=0",
    ])
    assert cfg.data.eval_pairs == 2 and cfg.dpo.loss == loss_type
    DiffusionDPOTrainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/pref_acc" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for record in evals:
        assert 0.0 <= record["eval/pref_acc"] <= 1.0 and record["eval/denoising_loss"] > 0
    assert evals[0]["eval/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA at zero = reference


def test_dpo_on_brighter_wins_pairs_brightens_sampled_images(tmp_path):
    """The direction on *sampled* images: 30 DPO steps on builtin:brightness (the brighter image
    wins) on tiny-flux raise the mean brightness of 4-step samples of fixed prompts and seeds
    from the LoRA against the base (measured 0.5327 -> 0.5400).

    Why tiny-flux: on the random-weight epsilon-prediction UNets (tiny-sd, tiny-sdxl) no
    objective moves the brightness of samples reliably, so they cannot show the direction. The
    old quickstart (tiny-sdxl, 100 steps) made samples darker, 0.4928 -> 0.4720 at guidance 1
    (16 prompts, seed i, 4 steps; 0.4977 -> 0.4430 at CFG 5), while held-out accuracy rose to
    1.0. It is not a mismatch between training and sampling: on the training inputs themselves,
    noised exactly as training does, the LoRA's x0 prediction is darker at every t (RGB mean
    0.204 -> -0.468 at t = 950, 0.056 -> 0.039 at t = 50); and plain denoising (dpo.loss: sft)
    on near-white winners (0.85-0.95), 150 steps, darkens samples of tiny-sd (0.4964 -> 0.4863)
    and tiny-sdxl (0.4928 -> 0.4671) but brightens tiny-flux (0.5208 -> 0.6525). The image-mean
    direction is 1/192 of the epsilon MSE, the loss improves elsewhere, and DDIM's first steps
    amplify a bias of eps along it by 1/sqrt(alpha_bar) (about 14 at t = 951); the flow model
    (zero terminal SNR, velocity target) learns it. 100 DPO steps: tiny-sd 0.4964 -> 0.5252,
    tiny-flux 0.5208 -> 0.5513, tiny-sdxl 0.4928 -> 0.4720. The trained shapes world replaces
    the tiny random models for this check."""
    from sampled_direction import sampled_reward

    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = dpo_config(tmp_path, "tiny-flux", **{
        "lora.rank": 8, "lora.alpha": 16, "train.max_steps": 30, "train.batch_size": 4, "train.warmup_steps": 3,
        "train.checkpoint_every": 0, "data.num_workers": 0})
    trainer = DiffusionDPOTrainer(cfg)
    trainer.train()
    base, tuned = sampled_reward(trainer.policy)
    assert tuned > base + 3e-3, (base, tuned)
