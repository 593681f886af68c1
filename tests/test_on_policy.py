"""The on-policy consistency check (diffalign/on_policy.py) and its wiring into GRPO and D3PO:
ratio statistics by hand, the tolerance per dtype, one warning naming the likely cause, and real
runs on the tiny models (fp32 on a CPU: the ratio is 1; a rollout in bf16 trained in fp32: warned)."""

from __future__ import annotations

import contextlib
import json
import math
import warnings

import pytest
import torch

from diffalign.on_policy import OnPolicyCheck, ratio_statistics


def test_ratio_statistics_by_hand():
    """log-ratios (0, log 2, log 0.5): ratios 1, 2, 0.5 -> mean 3.5 / 3 = 1.1666667, min 0.5, max 2,
    max |ratio - 1| = 1."""
    stats = ratio_statistics(torch.tensor([0.0, math.log(2.0), math.log(0.5)]), torch.zeros(3))
    assert float(stats["ratio_mean"]) == pytest.approx(1.1666667)
    assert (float(stats["ratio_min"]), float(stats["ratio_max"]), float(stats["ratio_dev"])) == pytest.approx((0.5, 2.0, 1.0))


def test_check_warns_once_naming_the_layouts_cause_first():
    """bf16 allows max |ratio - 1| <= 0.05; a log-ratio of 0.1 (ratio 1.105) fails. The warning names
    the batch layout that differs (12 chains per sampler call, 3 per pass) before the other causes,
    and comes once; calls that are not on-policy are never checked; a pass within the tolerance
    after a failure leaves ``passed`` false."""
    check = OnPolicyCheck(torch.bfloat16, sample_batch=12, train_batch=3, method="grpo")
    check(torch.full((4,), 0.3), torch.zeros(4), on_policy=False)  # after an update: not checked
    assert check.passed is None
    with pytest.warns(RuntimeWarning, match=r"grpo: on-policy check failed: .* 1\.1052\.\.1\.1052 .* > 0\.05 allowed in "
                                            r"bfloat16.*Likely causes: a different batch size \(12 chains per sampler "
                                            r"call, 3 per training pass.*; a dtype mismatch .*; an attention kernel"):
        stats = check(torch.full((4,), 0.1), torch.zeros(4))
    assert check.passed is False and float(stats["ratio_max"]) == pytest.approx(math.exp(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(torch.full((4,), 0.2), torch.zeros(4))  # warned once only
        check(torch.zeros(4), torch.zeros(4))
    assert check.passed is False
    fp32 = OnPolicyCheck(torch.float32, sample_dtype=torch.bfloat16, train_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp32(torch.full((2,), 5e-5), torch.zeros(2))
    assert fp32.passed is True and fp32.likely_causes()[0].startswith("a dtype mismatch between rollout (torch.bfloat16)")


def _grpo_config(tmp_path, **section):
    from diffalign.config import load_config

    return load_config({
        "method": "grpo", "model": "tiny-flux", "output_dir": str(tmp_path / "run"), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 2, "checkpoint_every": 0},
        "grpo": {"reward": "brightness", "prompts": ["a cat"], "group_size": 4, "prompts_per_round": 1, "num_steps": 3,
                 "sample_batch_size": 4, **section},
    })


def _on_policy_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "on-policy check" in str(w.message)]


def test_grpo_on_policy_on_a_cpu_and_ratio_statistics_every_step(tmp_path):
    """fp32 on a CPU, sampled 4 chains per call, trained 2 per pass: the first update's ratio is 1
    (check passed, no warning); every step logs the ratio's statistics (the second step is after an
    update, so its ratio moves off 1)."""
    from diffalign.trainers.pref_grpo import GRPOTrainer

    trainer = GRPOTrainer(_grpo_config(tmp_path), overwrite=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert _on_policy_warnings(record) == [] and trainer.on_policy_check.passed is True
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 2 and all({"ratio_mean", "ratio_min", "ratio_max", "ratio_dev"} <= r.keys() for r in steps)
    assert steps[0]["ratio_dev"] < 1e-6 and steps[1]["ratio_dev"] > 0


def test_grpo_rollout_in_bf16_trained_in_fp32_is_warned(tmp_path):
    """The rollout runs under bf16 autocast while training re-scores in fp32 (a dtype mismatch): the
    first update's ratio is off by more than fp32's 1e-4 (measured here: ~1e-3 at the last of 3
    steps) and the run warns once, naming the causes."""
    from diffalign.trainers.pref_grpo import GRPOTrainer

    trainer = GRPOTrainer(_grpo_config(tmp_path), overwrite=True)
    sample_round = trainer.sample_round

    def sample_in_bf16(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample_round(*args, **kwargs)

    trainer.sample_round = sample_in_bf16
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    messages = _on_policy_warnings(record)
    assert len(messages) == 1 and trainer.on_policy_check.passed is False
    assert "grpo: on-policy check failed" in messages[0] and "allowed in float32" in messages[0]
    assert "a dtype mismatch" in messages[0] and "an attention kernel" in messages[0]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ratio_dev"] > 1e-4  # logged (averaged over the step's passes)


def test_d3po_runs_the_check_on_its_online_pairs(tmp_path):
    from diffalign.config import load_config
    from diffalign.trainers.d3po import D3POTrainer

    cfg = load_config({
        "method": "d3po", "model": "tiny-sd", "output_dir": str(tmp_path / "run"), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": 1, "learning_rate": 1e-2, "batch_size": 2, "checkpoint_every": 0},
        "d3po": {"reward": "brightness", "prompts": ["a cat"], "num_steps": 2},
    })
    trainer = D3POTrainer(cfg, overwrite=True)
    with contextlib.ExitStack() as stack:
        record = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        trainer.train()
    assert _on_policy_warnings(record) == [] and trainer.on_policy_check.passed is True
    step = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert step and step[0]["ratio_dev"] < 1e-6
