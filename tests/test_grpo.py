"""GRPO / Pref-GRPO: the loss and KL by hand, win-rate and advantage maths, the config, and the
trainers on the tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffalign.losses import gaussian_mean_kl, grpo_loss
from diffalign.trainers.pref_grpo import group_advantages, pairwise_win_rates

# --- the loss, by hand -----------------------------------------------------------------------


def test_grpo_loss_every_clip_branch():
    """clip_range 0.2; four samples covering each branch of max(-A r, -A clamp(r, 0.8, 1.2)):

        A = +1, r = 1.5: max(-1.5, -1.2) = -1.2   clipped   -> no gradient
        A = +1, r = 0.5: max(-0.5, -0.8) = -0.5   unclipped -> d/dlogp = -A r / 4 = -0.125
        A = -2, r = 1.5: max( 3.0,  2.4) =  3.0   unclipped -> d/dlogp = -A r / 4 = +0.75
        A = -2, r = 0.5: max( 1.0,  1.6) =  1.6   clipped   -> no gradient
        loss = (-1.2 - 0.5 + 3.0 + 1.6) / 4 = 0.725
    clip_frac = 1 (every |r - 1| = 0.5 > 0.2); approx_kl = 0.5 * mean(log(r)^2)
    = 0.5 * (0.1644019 + 0.4804530) / 2 = 0.1612137.
    """
    old = torch.zeros(4)
    log_prob = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -2.0, -2.0])
    loss, metrics = grpo_loss(log_prob, old, advantages, clip_range=0.2)
    assert loss.item() == pytest.approx(0.725, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.125, 0.75, 0.0]))
    assert float(metrics["clip_frac"]) == 1.0
    assert float(metrics["approx_kl"]) == pytest.approx(0.1612137, abs=1e-6)
    assert "kl_ref" not in metrics


def test_grpo_loss_with_kl_to_the_reference():
    """Same four samples, kl = (0.2, 0.4, 0.0, 0.2), kl_beta 0.5: loss = 0.725 + 0.5 * 0.2 = 0.825,
    and the KL term's gradient is kl_beta / B = 0.125 per sample."""
    log_prob = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)])
    kl = torch.tensor([0.2, 0.4, 0.0, 0.2], requires_grad=True)
    loss, metrics = grpo_loss(log_prob, torch.zeros(4), torch.tensor([1.0, 1.0, -2.0, -2.0]), 0.2, kl=kl, kl_beta=0.5)
    assert loss.item() == pytest.approx(0.825, abs=1e-6)
    assert float(metrics["kl_ref"]) == pytest.approx(0.2) and float(metrics["policy_loss"]) == pytest.approx(0.725, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.full((4,), 0.125))


def test_grpo_loss_on_policy_is_minus_mean_advantage():
    """At sampling time r = 1 exactly: loss = mean(-A) and d loss / d logp_i = -A_i / B."""
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, metrics = grpo_loss(log_prob, log_prob.detach(), torch.tensor([0.5, -1.5]), clip_range=1e-4)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.25, 0.75]))
    assert float(metrics["clip_frac"]) == 0.0 and float(metrics["approx_kl"]) == 0.0 and float(metrics["ratio"]) == 1.0


def test_gaussian_mean_kl_by_hand():
    """Two samples of 2 elements. Row 0: means (1, 2) vs (0, 0), std 0.5:
    KL = mean(1 / (2 * 0.25), 4 / (2 * 0.25)) = mean(2, 8) = 5. Row 1: std 0 (a deterministic
    step) -> 0 whatever the means."""
    mean_p = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean_q = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    std = torch.tensor([[0.5], [0.0]])
    torch.testing.assert_close(gaussian_mean_kl(mean_p, mean_q, std), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(gaussian_mean_kl(mean_p, mean_p, 0.3), torch.zeros(2))


# --- win rates and advantages ----------------------------------------------------------------


def test_pairwise_win_rates_by_hand():
    """G = 3, P(0 beats 1) = 0.9, P(0 beats 2) = 0.5 (tie), P(1 beats 2) = 0.2:
        image 0: win vs 1 (1) + tie vs 2 (0.5) = 1.5 -> 1.5 / 2 = 0.75
        image 1: loss vs 0 (0) + loss vs 2 (0) = 0   -> 0
        image 2: tie vs 0 (0.5) + win vs 1 (1) = 1.5 -> 0.75
    (they average 0.5). The lower triangle is never read. With tie_margin 0.45 every pair is a tie."""
    prefs = torch.tensor([[[0.0, 0.9, 0.5], [123.0, 0.0, 0.2], [-5.0, 7.0, 0.0]]])
    torch.testing.assert_close(pairwise_win_rates(prefs), torch.tensor([[0.75, 0.0, 0.75]]))
    torch.testing.assert_close(pairwise_win_rates(prefs, tie_margin=0.45), torch.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_win_rates(torch.zeros(1, 1, 1))


def test_win_rates_average_one_half_in_every_group():
    prefs = torch.rand(5, 6, 6, generator=torch.Generator().manual_seed(0))
    rates = pairwise_win_rates(prefs)
    torch.testing.assert_close(rates.mean(dim=1), torch.full((5,), 0.5))
    assert ((rates >= 0) & (rates <= 1)).all()


def test_group_advantages_by_hand():
    """rewards [[1, 2, 3], [5, 5, 5]]:
    per group: group 0 mean 2, population std sqrt(2/3) = 0.8164966 -> A = +-1 / (0.8164966 + 1e-4)
    = +-1.2245949, 0 in the middle; group 1 has no spread -> A = 0.
    global std: std of all six = sqrt(15.5 / 6) = 1.6072751 -> group 0 A = +-1 / 1.6073751 = +-0.6221323.
    clip_max 1: group-std advantages clamp to +-1."""
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    torch.testing.assert_close(group_advantages(rewards),
                               torch.tensor([[-1.2245949, 0.0, 1.2245949], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(group_advantages(rewards, global_std=True),
                               torch.tensor([[-0.6221323, 0.0, 0.6221323], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(group_advantages(rewards, clip_max=1.0), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_judge_groups_compares_every_pair_once():
    """Brightness of a group's images = 0.2, 0.5, 0.8 (constant images); its compare is
    sigmoid(10 * (r_a - r_b)): P(0 beats 1) = sigmoid(-3), P(0 beats 2) = sigmoid(-6),
    P(1 beats 2) = sigmoid(-3). Win rates: image 2 beats both (1.0), image 1 one (0.5), image 0 none (0)."""
    from diffalign.rewards import load_reward
    from diffalign.trainers.pref_grpo import judge_groups

    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.5, 0.8, 0.9, 0.1, 0.5)])
    prefs = judge_groups(load_reward("brightness"), images, ["a"] * 6, group_size=3)
    s3, s6 = torch.sigmoid(torch.tensor(-3.0)).item(), torch.sigmoid(torch.tensor(-6.0)).item()
    torch.testing.assert_close(prefs[0], torch.tensor([[0.0, s3, s6], [0.0, 0.0, s3], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(pairwise_win_rates(prefs), torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.5]]))


# --- config ----------------------------------------------------------------------------------


def _config(method="grpo", train=None, **section):
    from diffalign.config import load_config

    section = {"reward": "brightness", **section}
    return load_config({"method": method, "model": "tiny-flux", "train": train or {}, method: section})


def test_config_checks_reward_and_round_arithmetic():
    from diffalign.errors import UserError

    cfg = _config(method="pref_grpo")
    s = cfg.pref_grpo
    assert (s.group_size, s.clip_range, s.adv_clip_max, s.kl_beta, s.tie_margin) == (8, 1e-4, 5.0, 0.0, 0.0)
    with pytest.raises(UserError, match=r"pref_grpo.reward: unknown reward 'pikscore' \(did you mean 'pickscore'\?\)"):
        _config(method="pref_grpo", reward="pikscore")
    with pytest.raises(UserError, match=r"grpo.prompts_per_round x grpo.group_size = 6 images per round is not a "
                                        r"multiple of train.batch_size x train.gradient_accumulation_steps = 4"):
        _config(group_size=3, prompts_per_round=2, train={"batch_size": 4})
    with pytest.raises(UserError, match="unknown key 'grpo.group'; did you mean 'grpo.group_size'"):
        _config(group=4)


# --- training on the tiny models -------------------------------------------------------------

PROMPTS = ["a red cube", "a cat"]


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_built():
    """Build the tiny models before any run (a first build reseeds torch's global RNG and would
    change the LoRA initialisation of the run that triggers it)."""
    from diffalign.pipelines.tiny import TINY_MODELS, tiny_model_dir

    for name in TINY_MODELS:
        tiny_model_dir(name)


def _train(tmp_path, model, method="grpo", name="run", *, steps, lr, batch, section, eval_steps=None, **top):
    """Train GRPO / Pref-GRPO on a tiny model; returns (output dir, metrics records)."""
    from diffalign.config import get_method, load_config

    out = tmp_path / name
    data = {
        "method": method, "model": model, "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": steps, "learning_rate": lr, "batch_size": batch, "checkpoint_every": 0,
                  "lr_scheduler": "constant", **top.pop("train", {})},
        method: {"reward": "brightness", "prompts": PROMPTS, **section},
        "eval": ({"reward": "brightness", "prompts": PROMPTS, "num_steps": eval_steps, "num_images_per_prompt": 2}
                 if eval_steps else {}),
        **top,
    }
    cfg = load_config(data)
    get_method(method)[1](cfg, overwrite="resume" not in top).train()
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# (method, model, sampler steps, group size, groups per round, optimizer steps, learning rate); one
# round per optimizer step. Eval brightness after - before on seeds 0 / 1 / 2, measured:
# grpo sd +0.065 / +0.049 / +0.053, grpo sdxl +0.078 / +0.052 / +0.182,
# grpo flux +0.067 / +0.067 / +0.068, pref_grpo flux +0.063 / +0.061 / +0.068.
RAISE_SETTINGS = [
    ("grpo", "tiny-sd", 2, 4, 4, 8, 2e-2),
    ("grpo", "tiny-sdxl", 2, 8, 2, 8, 2e-2),
    ("grpo", "tiny-flux", 4, 8, 2, 8, 3e-2),
    ("pref_grpo", "tiny-flux", 4, 8, 2, 8, 3e-2),
    ("grpo", "tiny-sd3", 4, 8, 2, 8, 3e-2),
    ("pref_grpo", "tiny-sd3", 4, 8, 2, 8, 3e-2),
]


@pytest.mark.parametrize("method,model,num_steps,group,groups,steps,lr", RAISE_SETTINGS)
def test_grpo_with_brightness_raises_brightness(tmp_path, method, model, num_steps, group, groups, steps, lr):
    section = {"num_steps": num_steps, "group_size": group, "prompts_per_round": groups}
    out, records = _train(tmp_path, model, method, steps=steps, lr=lr, batch=group * groups, section=section,
                          eval_steps=num_steps)
    evals = [r["eval/brightness"] for r in records if "eval/brightness" in r]
    assert len(evals) == 2
    assert evals[1] > evals[0] + 0.02, f"eval brightness {evals[0]:.5f} -> {evals[1]:.5f}"
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == steps
    # one round per step: every update is on-policy, so the ratio is exactly 1 and nothing is clipped
    assert all(r["approx_kl"] == 0.0 and r["clip_frac"] == 0.0 for r in train_records)
    if method == "pref_grpo":
        assert all(r["reward"] == pytest.approx(0.5) for r in train_records)  # win rates average 1/2
        assert all(0.5 < r["win_rate_max"] <= 1.0 for r in train_records)
    else:
        assert train_records[-1]["reward"] > train_records[0]["reward"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_inner_epochs_kl_and_timestep_fraction_negative(tmp_path):
    """One round of 8 images, 2 inner epochs of 2 optimizer steps (micro-batches of 4), half of
    the 4 sampler steps each, KL to the reference, NPO negation:
    step 1 is on-policy (ratio 1, approx_kl 0, KL 0: the LoRA starts as the reference); later
    steps see the updated policy (approx_kl > 0, some ratios clipped, KL > 0). The reward is
    logged before negation and the final LoRA is marked negative."""
    from diffalign.lora import read_lora_metadata

    section = {"num_steps": 4, "group_size": 4, "prompts_per_round": 2, "num_inner_epochs": 2,
               "timestep_fraction": 0.5, "kl_beta": 0.1, "negative": True}
    out, records = _train(tmp_path, "tiny-flux", steps=4, lr=5e-2, batch=4, section=section)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    first, later = train_records[0], train_records[1:]
    assert first["approx_kl"] == 0.0 and first["ratio"] == 1.0 and first["kl_ref"] == 0.0
    assert all(r["approx_kl"] > 0 and r["kl_ref"] > 0 for r in later)
    assert max(r["clip_frac"] for r in later) > 0
    assert all(r["reward"] > 0 for r in train_records)  # brightness, not its negation
    meta = read_lora_metadata(out / "final")
    assert meta["negative"] == "true" and meta["method"] == "grpo"


def test_negative_negates_the_reward_before_the_advantages():
    from diffalign.config import load_config
    from diffalign.rewards import load_reward
    from diffalign.trainers.pref_grpo import GRPOTrainer, PrefGRPOTrainer

    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.5, 0.8, 0.4)])
    reward = load_reward("brightness")
    for method, trainer_cls, expected in [("grpo", GRPOTrainer, [[0.2, 0.5], [0.8, 0.4]]),
                                          ("pref_grpo", PrefGRPOTrainer, [[0.0, 1.0], [1.0, 0.0]])]:
        for negative in (False, True):
            cfg = load_config({"method": method, "model": "tiny-flux",
                               method: {"reward": "brightness", "group_size": 2, "negative": negative}})
            rewards, metrics = trainer_cls(cfg).score(reward, images, ["a", "b"])
            sign = -1.0 if negative else 1.0
            torch.testing.assert_close(rewards, sign * torch.tensor(expected))
            assert metrics["reward"] == pytest.approx(torch.tensor(expected).mean().item())


def test_round_sampled_in_chunks_keeps_chains_and_conditioning_aligned():
    """sample_batch_size splits a round into sampler calls; the joined trajectory keeps each
    chain with its own prompt's conditioning (its recorded log-probs recompute exactly), and each
    group of G starts from one noise."""
    from diffalign.config import load_config
    from diffalign.pipelines.loading import load_policy
    from diffalign.trainers.pref_grpo import GRPOTrainer

    cfg = load_config({"method": "grpo", "model": "tiny-sdxl", "train": {"batch_size": 6},
                       "grpo": {"reward": "brightness", "group_size": 3, "prompts_per_round": 2, "num_steps": 2,
                                "sample_batch_size": 4}})
    policy = load_policy("tiny-sdxl")
    trajectory = GRPOTrainer(cfg).sample_round(policy, ["a red cube", "a blue sphere"], torch.Generator().manual_seed(0))
    assert trajectory.latents.shape[:2] == (6, 3) and trajectory.images.shape[0] == 6 and len(trajectory.cond) == 6
    starts = trajectory.latents[:, 0]
    assert torch.equal(starts[0], starts[2]) and torch.equal(starts[3], starts[5]) and not torch.equal(starts[0], starts[3])
    with torch.no_grad():
        for step in range(2):
            torch.testing.assert_close(policy.log_prob(trajectory, step), trajectory.log_probs[:, step], rtol=0, atol=1e-5)


def test_grpo_resume_mid_run_continues_identically(tmp_path):
    """Two optimizer steps per round; 4 steps straight == 2 steps, checkpoint, resume for 2 more."""
    from safetensors.torch import load_file

    settings = dict(steps=4, lr=3e-2, batch=4, section={"num_steps": 2, "group_size": 4, "prompts_per_round": 2},
                    train={"checkpoint_every": 2})
    full, _ = _train(tmp_path, "tiny-flux", name="full", **settings)
    half, _ = _train(tmp_path, "tiny-flux", name="half", **{**settings, "steps": 2})
    resumed, records = _train(tmp_path, "tiny-flux", name="half", **settings, resume="latest")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    a = load_file(full / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Checkpoints inside a round: (method, section, train overrides, checkpoint_every, max_steps, resume
# step, position saved there as [inner epoch, first image of the next micro-batch]).
MID_ROUND = [
    # rounds of 8 images, 2 inner epochs of 2 steps (2 micro-batches of 2 each), half the sampler
    # steps: step 3 stops inside epoch 2, after its shuffle was drawn; step 4 ends the round
    ("grpo", {"num_steps": 2, "group_size": 4, "prompts_per_round": 2, "num_inner_epochs": 2,
              "timestep_fraction": 0.5, "kl_beta": 0.1}, {"batch_size": 2, "gradient_accumulation_steps": 2}, 3, 4, 3,
     [1, 4], ["step-4"]),
    # rounds of 4 images, 2 steps of 2: step 1 stops halfway through the round's only epoch, step 2
    # ends the round, step 3 stops inside the next one
    ("pref_grpo", {"num_steps": 2, "group_size": 4}, {"batch_size": 2}, 1, 3, 1, [0, 2], ["step-2"]),
    # the same with a 1-step SDE window, GRPO-Guard's ratio normalisation and per-chain steps: the
    # round's window and its sampling-time step means are restored too
    ("grpo", {"num_steps": 2, "group_size": 4, "sde_window_size": 1, "ratio_norm": True,
              "timestep_selection": "random_per_sample", "kl_beta": 0.1}, {"batch_size": 2}, 1, 3, 1, [0, 2], ["step-2"]),
]


@pytest.mark.parametrize("method,section,train,every,steps,resume_step,position,boundaries", MID_ROUND)
def test_resume_inside_a_round_continues_identically(tmp_path, method, section, train, every, steps, resume_step,
                                                     position, boundaries):
    """A checkpoint taken inside a round holds the round (samples, advantages, metrics, shuffle,
    position); resuming from it reproduces the straight run bitwise: LoRA and logged metrics."""
    from safetensors.torch import load_file

    settings = dict(steps=steps, lr=3e-2, batch=train["batch_size"], section=section,
                    train={**train, "checkpoint_every": every})
    out, records = _train(tmp_path, "tiny-flux", method, **settings)
    straight = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    folder = out / "checkpoints" / f"step-{resume_step}"
    saved = load_file(folder / "process-0.safetensors")
    assert saved["round.position"].tolist() == position
    assert saved["round.latents"].shape[:2] == (section["group_size"] * section.get("prompts_per_round", 1), 3)
    boundary_checkpoints = [p for p in sorted((out / "checkpoints").iterdir()) if not (p / "process-0.safetensors").exists()]
    assert [p.name for p in boundary_checkpoints] == boundaries
    if section.get("ratio_norm"):
        assert saved["round.means"].shape[:2] == (section["group_size"], 2) and saved["round.sde_window"].numel() == 2

    _, resumed_records = _train(tmp_path, "tiny-flux", method, **settings, resume=str(folder))
    resumed = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in records]
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed_records] == drop_time


# --- two processes -------------------------------------------------------------------------------


def test_two_process_grpo_global_std_keeps_ranks_identical_and_resumes_mid_round(tmp_path):
    """Two CPU processes (gloo): each samples its own group, the rewards and prompt picks are
    gathered for the round-wide std and per-prompt stats, each process takes its own advantages;
    the LoRA stays identical on both.
    Rounds of 2 steps (2 inner epochs): resuming both processes from step 3, inside the second
    round, reproduces step 4 bitwise, each process from its own saved round."""
    from conftest import run_two_processes
    from safetensors.torch import load_file

    result = run_two_processes(__file__, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)
    for rank in (0, 1):
        resumed = load_file(str(tmp_path / f"rank{rank}-resumed.safetensors"))
        assert all(torch.equal(resumed[k], rank0[k]) for k in rank0)
    step3 = tmp_path / "run" / "checkpoints" / "step-3"
    rounds = [load_file(str(step3 / f"process-{r}.safetensors")) for r in (0, 1)]
    assert not torch.equal(rounds[0]["round.latents"], rounds[1]["round.latents"])  # each its own samples
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert "x 2 processes = 8 images per round" in result.stdout


def _two_process_worker(out) -> None:
    import os

    from safetensors.torch import save_file

    from diffalign.config import load_config
    from diffalign.lora import lora_state_dict
    from diffalign.trainers.pref_grpo import GRPOTrainer

    data = {
        "method": "grpo", "model": "tiny-flux", "output_dir": str(out / "run"), "lora": {"rank": 4},
        "train": {"max_steps": 4, "learning_rate": 3e-2, "batch_size": 4, "checkpoint_every": 1},
        "grpo": {"reward": "brightness", "prompts": PROMPTS, "group_size": 4, "num_steps": 2, "global_std": True,
                 "per_prompt_stat_tracking": True, "num_inner_epochs": 2},
    }
    rank = os.environ["RANK"]
    for name, resume in (("", None), ("-resumed", str(out / "run" / "checkpoints" / "step-3"))):
        trainer = GRPOTrainer(load_config({**data, "resume": resume}), overwrite=resume is None)
        trainer.train()
        state = lora_state_dict(trainer.policy.denoiser)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}{name}.safetensors"))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    _two_process_worker(Path(sys.argv[1]))
