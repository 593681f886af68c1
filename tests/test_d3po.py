"""D3PO: the loss by hand, preferences (ties, NPO inversion), the config, the human-feedback
files (`diffalign sample` -> labels -> training), the trainer on the tiny models, and real
two-process runs (AI and human feedback).

This file is also the two-process worker: ``accelerate launch ... tests/test_d3po.py OUT MODE
[LABELS]``; the checks it shares with the DRaFT and Adjoint Matching ones are in
tests/two_process_checks.py.
"""

from __future__ import annotations

from conftest import run_two_processes
from two_process_checks import check_ranks_scored_their_own_images, check_two_process_run, train_recording_rank_outputs

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from diffalign.errors import UserError
from diffalign.losses import d3po_loss
from diffalign.trainers.d3po import pair_log_probs, preference_from_scores, train_step_indices

# --- the loss, by hand -----------------------------------------------------------------------


def test_d3po_loss_at_the_reference_is_log2():
    """policy == reference: both log-ratios 0, inside = 0.1 * (0 - 0) = 0, loss = -log sigmoid(0) = log 2."""
    logp = torch.tensor([-1.3, -0.7])
    loss, metrics = d3po_loss(logp, logp - 0.5, logp, logp - 0.5, beta=0.1, eps=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert float(metrics["implicit_acc"]) == 0.0 and float(metrics["clip_frac"]) == 0.0


def test_d3po_loss_inside_the_clamp_band():
    """log r_w = -1.00 - (-1.05) = 0.05 and log r_l = -2.00 - (-1.96) = -0.04, both inside
    [log 0.9, log 1.1] = [-0.10536, 0.09531], so nothing is clamped:
        inside = 0.1 * (0.05 - (-0.04)) = 0.009
        loss   = log(1 + exp(-0.009)) = 0.6886573
        d loss / d logp_w = -beta * sigmoid(-inside) = -0.1 * 0.4977500 = -0.0497750 (+ for logp_l)
    """
    logp_w = torch.tensor([-1.00], requires_grad=True)
    logp_l = torch.tensor([-2.00], requires_grad=True)
    loss, metrics = d3po_loss(logp_w, logp_l, torch.tensor([-1.05]), torch.tensor([-1.96]), beta=0.1, eps=0.1)
    assert loss.item() == pytest.approx(0.6886573, abs=1e-6)
    loss.backward()
    assert logp_w.grad.item() == pytest.approx(-0.0497750, abs=1e-6)
    assert logp_l.grad.item() == pytest.approx(0.0497750, abs=1e-6)
    assert float(metrics["implicit_acc"]) == 1.0 and float(metrics["clip_frac"]) == 0.0
    assert float(metrics["log_ratio_w"]) == pytest.approx(0.05) and float(metrics["log_ratio_l"]) == pytest.approx(-0.04)


def test_d3po_loss_clamps_hard():
    """log r_w = 0.5 > log 1.1 and log r_l = -0.5 < log 0.9: both ratios sit on the clamp,
        inside = 0.1 * (log 1.1 - log 0.9) = 0.0200671, loss = log(1 + exp(-0.0200671)) = 0.6831640,
    and, clamped hard, neither log-prob gets a gradient."""
    logp_w = torch.tensor([0.0], requires_grad=True)
    logp_l = torch.tensor([0.0], requires_grad=True)
    loss, metrics = d3po_loss(logp_w, logp_l, torch.tensor([-0.5]), torch.tensor([0.5]), beta=0.1, eps=0.1)
    assert loss.item() == pytest.approx(0.6831640, abs=1e-6)
    loss.backward()
    assert logp_w.grad.item() == 0.0 and logp_l.grad.item() == 0.0
    assert float(metrics["clip_frac"]) == 1.0


def test_d3po_loss_rejects_bad_eps():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="eps"):
        d3po_loss(x, x, x, x, eps=1.0)


# --- preferences -----------------------------------------------------------------------------


def test_preference_from_scores_higher_wins_ties_skipped_and_npo_inverts():
    """Pairs (0.2, 0.7) -> chain 1 wins; (0.9, 0.1) -> chain 0; (0.5, 0.5) -> tie, skipped.
    Diffusion-NPO (negative) flips every winner: the lower score wins."""
    scores = torch.tensor([[0.2, 0.7], [0.9, 0.1], [0.5, 0.5]])
    winner, valid = preference_from_scores(scores)
    assert winner.tolist()[:2] == [1, 0] and valid.tolist() == [True, True, False]
    neg_winner, neg_valid = preference_from_scores(scores, negative=True)
    assert neg_winner.tolist()[:2] == [0, 1] and neg_valid.tolist() == valid.tolist()


def test_pareto_preference_over_several_rewards():
    """Rewards (K = 2) per image, as the official D3PO compare() (yk7333/d3po,
    scripts/train_with_rm.py): an image wins when it is >= on every reward and > on one.
      pair 0: a = (30, 10), b = (20, 8)   -> a dominates: winner 0
      pair 1: a = (30, 10), b = (40, 4)   -> neither dominates: skipped
      pair 2: a = (1, 2),   b = (1, 3)    -> b >= a everywhere, > on reward 1: winner 1
      pair 3: a = (5, 5),   b = (5, 5)    -> equal: skipped
    Negative (NPO) flips the winners of the valid pairs; the single-reward rule is K = 1."""
    scores = torch.tensor([[[30.0, 10.0], [20.0, 8.0]], [[30.0, 10.0], [40.0, 4.0]],
                           [[1.0, 2.0], [1.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    winner, valid = preference_from_scores(scores)
    assert valid.tolist() == [True, False, True, False]
    assert winner[valid].tolist() == [0, 1]
    neg_winner, neg_valid = preference_from_scores(scores, negative=True)
    assert neg_valid.tolist() == valid.tolist() and neg_winner[valid].tolist() == [1, 0]
    one = preference_from_scores(scores[..., :1])
    assert one[1].tolist() == [True, True, False, False] and one[0][:2].tolist() == [0, 1]


def test_d3po_trains_on_a_pareto_vector_of_rewards(tmp_path):
    """d3po.reward as a list: both rewards score both images of a pair; pairs where neither
    image dominates (brighter but less saturated) are skipped and counted in tie_frac; each
    reward's mean is logged. A bad spec in the list names its index."""
    out, records = _train(tmp_path, "tiny-sd", steps=2, lr=1e-2, batch=4,
                          d3po={"reward": ["brightness", "saturation"], "num_steps": 2})
    train = [r for r in records if "loss" in r or "pairs" in r]
    assert len(train) == 2
    assert all("reward/brightness" in r and "reward/saturation" in r for r in train)
    assert all(0 <= r["pairs"] <= 4 and r["tie_frac"] == pytest.approx(1 - r["pairs"] / 4) for r in train)
    from diffalign.config import load_config

    with pytest.raises(UserError, match=r"d3po.reward\[1\]"):
        load_config({"method": "d3po", "d3po": {"reward": ["brightness", "no_such_reward"]}})


def test_pair_log_probs_picks_winner_and_loser():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    w, l = pair_log_probs(logp, torch.tensor([1, 0]))
    assert w.tolist() == [-2.0, -3.0] and l.tolist() == [-1.0, -4.0]


def test_train_step_indices():
    g = torch.Generator().manual_seed(0)
    assert train_step_indices(4, 1.0, g) == [0, 1, 2, 3]
    half = train_step_indices(10, 0.5, g)
    assert len(half) == 5 and half == sorted(set(half)) and all(0 <= i < 10 for i in half)
    assert len(train_step_indices(3, 0.01, g)) == 1  # at least one step


# --- config ----------------------------------------------------------------------------------


def _config(**d3po):
    from diffalign.config import load_config

    return load_config({"method": "d3po", "model": "tiny-sd", "d3po": d3po})


def test_config_needs_exactly_one_feedback_source():
    with pytest.raises(UserError, match=r"exactly one of d3po.reward .* and d3po.labels .* got neither"):
        _config()
    with pytest.raises(UserError, match="got both"):
        _config(reward="brightness", labels="feedback/labels.jsonl")
    with pytest.raises(UserError, match=r"d3po.reward: unknown reward 'brightnes' \(did you mean 'brightness'\?\)"):
        _config(reward="brightnes")
    cfg = _config(reward="jpeg_compressibility")  # AI feedback needs no gradient of the reward
    assert (cfg.d3po.beta, cfg.d3po.eps, cfg.d3po.timestep_fraction, cfg.d3po.num_steps) == (0.1, 0.1, 1.0, 20)


# --- training on the tiny models -------------------------------------------------------------

PROMPTS = ["a red cube", "a cat"]


def _train(tmp_path, model: str, name: str = "run", *, steps: int, lr: float, batch: int, d3po: dict,
           eval_steps: int | None = None, **top):
    """Train D3PO on a tiny model; returns (output dir, metrics records)."""
    from diffalign.config import load_config
    from diffalign.trainers.d3po import D3POTrainer

    out = tmp_path / name
    data = {
        "method": "d3po", "model": model, "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": steps, "learning_rate": lr, "batch_size": batch, "checkpoint_every": 0,
                  "lr_scheduler": "constant"},
        "d3po": {"prompts": PROMPTS, "beta": 1.0, **d3po},
        "eval": ({"reward": "brightness", "prompts": PROMPTS, "num_steps": eval_steps, "num_images_per_prompt": 2}
                 if eval_steps else {}),
        **top,
    }
    D3POTrainer(load_config(data), overwrite="resume" not in top).train()
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# (model, sampler steps, pairs per step, optimizer steps, learning rate), chosen so the reward rises
# on every seed tried: eval brightness after - before, seeds 0 / 1 / 2, measured:
# sd +0.058 / +0.003 / +0.031, sdxl +0.033 / +0.045 / +0.049, flux +0.016 / +0.011 / +0.026.
RAISE_SETTINGS = [("tiny-sd", 4, 8, 8, 2e-2), ("tiny-sdxl", 4, 8, 8, 1e-2), ("tiny-flux", 4, 16, 8, 2e-2)]


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_built():
    """Build the tiny models before any run: a first build reseeds torch's global RNG (the
    builders call torch.manual_seed), which would change the LoRA initialisation of the run that
    triggers it and make results depend on test order."""
    from diffalign.pipelines.tiny import TINY_MODELS, tiny_model_dir

    for name in TINY_MODELS:
        tiny_model_dir(name)


@pytest.mark.parametrize("model,num_steps,batch,steps,lr", RAISE_SETTINGS)
def test_d3po_with_brightness_feedback_raises_brightness(tmp_path, model, num_steps, batch, steps, lr):
    out, records = _train(tmp_path, model, steps=steps, lr=lr, batch=batch,
                          d3po={"reward": "brightness", "num_steps": num_steps}, eval_steps=num_steps)
    evals = [r["eval/brightness"] for r in records if "eval/brightness" in r]
    assert len(evals) == 2
    assert evals[1] > evals[0] + 5e-3, f"eval brightness {evals[0]:.5f} -> {evals[1]:.5f}"
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == steps
    assert train_records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert all(r["pairs"] == batch for r in train_records)  # brightness never ties on these images
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_d3po_resume_mid_run_continues_identically(tmp_path):
    """4 steps straight == 2 steps, checkpoint, then resume=latest for the last 2: the final LoRAs
    match bit for bit (RNG streams, optimizer and LoRA restored)."""
    from safetensors.torch import load_file

    settings = dict(steps=4, lr=5e-2, batch=2, d3po={"reward": "brightness", "num_steps": 2})
    full, _ = _train(tmp_path, "tiny-flux", "full", **settings)
    half, _ = _train(tmp_path, "tiny-flux", "half", **{**settings, "steps": 2})
    assert (half / "checkpoints" / "step-2").is_dir()
    resumed, records = _train(tmp_path, "tiny-flux", "half", **settings, resume="latest")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    a = load_file(full / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k or "lora.up" in k)


# --- human feedback: diffalign sample -> labels -> training -----------------------------------


def _recipe(tmp_path, **d3po) -> str:
    import yaml

    path = tmp_path / "d3po.yaml"
    section = {"reward": "brightness", "num_steps": 2, "prompts": ["a red cube", "a cat", "a tree"],
               "guidance_scale": 3.0, **d3po}
    path.write_text(yaml.safe_dump({"method": "d3po", "model": "tiny-sd", "d3po": section}))
    return str(path)


def _fill(labels, choices):
    lines = [json.loads(line) for line in labels.read_text().splitlines()]
    for line, choice in zip(lines, choices):
        line["choice"] = choice
    labels.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def test_sample_command_writes_pairs_and_a_labels_template(tmp_path, capsys):
    from safetensors import safe_open

    from diffalign.cli import main

    out = tmp_path / "feedback"
    assert main(["sample", _recipe(tmp_path), "--out", str(out), "--num-pairs", "4", "--batch-size", "3"]) == 0
    assert "labels to fill in" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == ["000000", "000001", "000002", "000003"]
    assert [line["prompt"] for line in lines] == ["a red cube", "a cat", "a tree", "a red cube"]
    assert all(line["choice"] is None for line in lines)
    assert all((out / line[f"image_{k}"]).is_file() for line in lines for k in (0, 1))
    with safe_open(str(out / "trajectories.safetensors"), framework="pt") as f:
        latents, log_probs = f.get_tensor("latents"), f.get_tensor("log_probs")
    assert latents.shape == (4, 2, 3, 4, 8, 8) and log_probs.shape == (4, 2, 2)
    assert torch.equal(latents[:, 0, 0], latents[:, 1, 0])  # one starting noise per pair
    assert not torch.equal(latents[:, 0, -1], latents[:, 1, -1])

    # a second round into the same folder would destroy labels: refused without --overwrite
    assert main(["sample", _recipe(tmp_path), "--out", str(out)]) == 2
    assert "already holds a labels round" in capsys.readouterr().err


def test_labels_load_recompute_and_errors(tmp_path):
    from diffalign.config import load_config
    from diffalign.feedback import load_labelled_pairs, write_feedback_round
    from diffalign.pipelines.loading import load_policy

    cfg = load_config(_recipe(tmp_path))
    policy = load_policy("tiny-sd")
    labels = write_feedback_round(policy, cfg, tmp_path / "fb", num_pairs=3)
    with pytest.raises(UserError, match="no pair in .* has a choice yet"):
        load_labelled_pairs(labels, policy, "tiny-sd")

    _fill(labels, [1, "tie", 0])
    pairs = load_labelled_pairs(labels, policy, "tiny-sd")
    assert (len(pairs), pairs.skipped, pairs.winners) == (2, 1, [1, 0])
    trajectory, winner = pairs.batch(policy, [0, 1])
    assert winner.tolist() == [1, 0]
    assert pairs.batch(policy, [0, 1], negative=True)[1].tolist() == [0, 1]  # Diffusion-NPO flips it
    with torch.no_grad():  # the recorded chains re-score exactly under the model that sampled them
        for step in range(2):
            torch.testing.assert_close(policy.log_prob(trajectory, step), trajectory.log_probs[:, step],
                                       rtol=0, atol=1e-5)

    with pytest.raises(UserError, match="sampled from model 'tiny-sd', but model is 'tiny-sdxl'"):
        load_labelled_pairs(labels, None, "tiny-sdxl")
    lines = _fill(labels, [1, "tie", 0])
    lines[2]["pair_id"] = "000042"
    labels.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(UserError, match=r"labels.jsonl:3: pair_id '000042' is not in .*trajectories.safetensors"):
        load_labelled_pairs(labels, policy, "tiny-sd")
    _fill(labels, [1, "left", 0])
    with pytest.raises(UserError, match=r"labels.jsonl:2: choice 'left' for pair 000001: write 0 or 1"):
        load_labelled_pairs(labels, policy, "tiny-sd")
    with pytest.raises(UserError, match="not found"):
        load_labelled_pairs(tmp_path / "nowhere" / "labels.jsonl")


def test_training_on_human_labels_negative_marks_the_lora(tmp_path):
    """Labels on disk train the LoRA (no reward involved); with d3po.negative the final LoRA's
    metadata says negative, for the NPO inference side."""
    from diffalign.config import load_config
    from diffalign.feedback import write_feedback_round
    from diffalign.lora import read_lora_metadata
    from diffalign.pipelines.loading import load_policy

    labels = write_feedback_round(load_policy("tiny-sd"), load_config(_recipe(tmp_path)), tmp_path / "fb", num_pairs=3)
    _fill(labels, [0, 1, 1])
    out, records = _train(tmp_path, "tiny-sd", steps=2, lr=1e-2, batch=2,
                          d3po={"labels": str(labels), "negative": True, "num_steps": 7})  # num_steps: from the file
    train_records = [r for r in records if "loss" in r]
    assert [r["pairs"] for r in train_records] == [2.0, 2.0]
    assert train_records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train_records[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    meta = read_lora_metadata(out / "final")
    assert meta["negative"] == "true" and meta["method"] == "d3po"


# --- two processes -------------------------------------------------------------------------------


def _d3po_two_process_config(out: Path, labels: str | None, batch_size: int = 2):
    from diffalign.config import load_config

    feedback = {"labels": labels} if labels else {"reward": "recorded_brightness", "num_steps": 2}
    return load_config({
        "method": "d3po", "model": "tiny-sd", "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": batch_size, "checkpoint_every": 1,
                  "lr_scheduler": "constant"},
        "d3po": {"prompts": ["a red cube", "a cat", "a tree"], "beta": 1.0, **feedback},
    })


def test_two_process_d3po_ai_feedback_keeps_ranks_identical_and_only_rank0_writes(tmp_path):
    """Two gloo CPU processes, reward (AI) feedback: each rank samples its own pairs (its own noise
    stream), the averaged gradients keep the LoRA identical on both, and only rank 0 writes."""
    result = run_two_processes(__file__, str(tmp_path), "reward", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = check_two_process_run(tmp_path, steps=2, checkpoints=["step-1", "step-2"])
    assert "batch: 2 pairs per process x 2 processes x 1 accumulation steps = 4 pairs per optimizer step" in result.stdout
    # one reward call per step on each rank, both chains of 2 pairs; the ranks' images differ
    check_ranks_scored_their_own_images(rank0, rank1, [4, 4])


def test_two_process_d3po_human_labels_shard_the_pairs(tmp_path):
    """Two processes on 4 labelled pairs, 2 per process: each step covers the whole set (rank 0
    the first half of the epoch's order, rank 1 the second), so the synced LoRA equals one process
    training on all 4 pairs per step, and differs from one process on 2 (what ranks sharing a
    shard would give)."""
    from safetensors.torch import load_file

    from diffalign.config import load_config
    from diffalign.feedback import write_feedback_round
    from diffalign.lora import lora_state_dict
    from diffalign.pipelines.loading import load_policy
    from diffalign.trainers.d3po import D3POTrainer

    labels = write_feedback_round(load_policy("tiny-sd"), load_config(_recipe(tmp_path)), tmp_path / "fb", num_pairs=4)
    _fill(labels, [0, 1, 1, 0])
    result = run_two_processes(__file__, str(tmp_path), "labels", str(labels), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    check_two_process_run(tmp_path, steps=2, checkpoints=["step-1", "step-2"])
    assert "data: 4 pairs -> 1 optimizer steps per epoch, 2.00 epochs" in result.stdout
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["data_state"] == {"epoch": 1, "position": 4}

    # One process per batch size. Equal up to rounding, not bitwise: Adam divides by each gradient
    # entry's magnitude, so entries near zero carry rounding into the weights. Measured: LoRA change
    # 1.57, two processes vs one on 4 pairs 3e-4, vs one on 2 pairs 1.66.
    init, two = (load_file(str(tmp_path / f"rank0-{name}.safetensors")) for name in ("init", "final"))
    one = {}
    for batch in (4, 2):
        trainer = D3POTrainer(_d3po_two_process_config(tmp_path / f"one-process-{batch}", str(labels), batch_size=batch))
        trainer.train()
        one[batch] = lora_state_dict(trainer.policy.denoiser)
    change = _distance(one[4], init)
    assert _distance(two, one[4]) < 1e-2 * change
    assert _distance(two, one[2]) > 0.3 * change


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The Euclidean distance between two LoRAs (same keys)."""
    return math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in a))


def _two_process_worker(out: Path, mode: str, labels: str | None = None) -> None:
    from diffalign.trainers.d3po import D3POTrainer

    labels = labels if mode == "labels" else None
    train_recording_rank_outputs(out, D3POTrainer, lambda: _d3po_two_process_config(out / "run", labels))

if __name__ == "__main__":
    _two_process_worker(Path(sys.argv[1]), *sys.argv[2:])


def test_human_labels_sampled_with_a_lora_train_that_model(tmp_path):
    """``diffalign sample --lora X`` pairs train base + X (init_lora: X): without it, or with
    another LoRA, loading the labels is a one-line error naming the fix; base-model pairs refuse
    an init_lora. With init_lora X and reference: init, the policy at step 0 is the model that
    sampled the chains: they re-score to their recorded log-probs, and the first D3PO loss is
    exactly log 2 (policy == reference == base + X)."""
    from diffalign import lora
    from diffalign.config import LoraSettings, load_config
    from diffalign.feedback import load_labelled_pairs, write_feedback_round
    from diffalign.pipelines.loading import load_policy

    sampler = load_policy("tiny-sd")
    params = lora.add_lora(sampler.denoiser, "sd", LoraSettings(rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    x = lora.save_lora(sampler.pipe, sampler.denoiser, tmp_path / "x", family="sd")
    labels = write_feedback_round(sampler, load_config(_recipe(tmp_path)), tmp_path / "fb", num_pairs=3, lora_dir=str(x))
    _fill(labels, [0, 1, 1])
    with pytest.raises(UserError, match=f"sampled from tiny-sd \\+ LoRA {x}; set init_lora={x}"):
        load_labelled_pairs(labels, None, "tiny-sd")
    pairs = load_labelled_pairs(labels, None, "tiny-sd", init_lora=str(x))
    trajectory, _ = pairs.batch(sampler, [0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(sampler.log_prob(trajectory, 0), trajectory.log_probs[:, 0], rtol=0, atol=1e-5)

    base_labels = write_feedback_round(load_policy("tiny-sd"), load_config(_recipe(tmp_path)), tmp_path / "fb0", num_pairs=2)
    _fill(base_labels, [0, 1])
    with pytest.raises(UserError, match="sampled from the base model tiny-sd, but init_lora="):
        load_labelled_pairs(base_labels, None, "tiny-sd", init_lora=str(x))

    _, records = _train(tmp_path, "tiny-sd", steps=2, lr=1e-2, batch=3, d3po={"labels": str(labels)},
                        init_lora=str(x), reference="init")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] != pytest.approx(math.log(2), abs=1e-6)
