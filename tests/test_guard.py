"""The reward-hacking guard: its decision on synthetic metric streams (every branch), diversity by
hand, the config section, and real tiny runs where brightness is trained and hacked against a
held-out saturation reward (stop, rollback, warn, keep_best)."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.guard import Check, GuardStopped, HackingDetector, pairwise_diversity


def _stream(detector: HackingDetector, checks: list[tuple]) -> list:
    """(heldout, diversity, train) per check, steps 0, 10, 20, ...; the verdicts."""
    return [detector.observe(Check(10 * i, h, d, t)) for i, (h, d, t) in enumerate(checks)]


# --- the decision on synthetic streams ---------------------------------------------------------


def test_start_then_rising_heldout_is_ok():
    verdicts = _stream(HackingDetector(tolerance=0.05), [(0.5, 1.0, None), (0.6, 1.0, 0.2), (0.7, 1.0, 0.3)])
    assert [v.verdict for v in verdicts] == ["ok", "ok", "ok"]
    assert verdicts[0].reason == "start"
    assert [(v.best_step, v.best_heldout) for v in verdicts] == [(0, 0.5), (10, 0.6), (20, 0.7)]
    assert not any(v.act for v in verdicts)


def test_training_up_heldout_down_is_hacking():
    """best 0.8 at step 10 with training reward 0.3; at step 20 training 0.5 > 0.3 and held-out
    0.7: 0.8 - 0.7 = 0.1 > 0.05 -> hacking."""
    verdicts = _stream(HackingDetector(tolerance=0.05), [(0.5, 1.0, None), (0.8, 1.0, 0.3), (0.7, 1.0, 0.5)])
    last = verdicts[-1]
    assert (last.verdict, last.act, last.best_step, last.best_heldout) == ("hacking", True, 10, 0.8)
    assert last.reason == ("training reward rose to 0.5 (from 0.3) while the held-out reward fell 0.1 below its "
                           "best 0.8 (step 10)")


def test_heldout_down_without_training_up_is_not_hacking():
    """The training reward fell too (0.3 -> 0.2): the run is failing, not hacking."""
    last = _stream(HackingDetector(tolerance=0.05), [(0.5, 1.0, None), (0.8, 1.0, 0.3), (0.6, 1.0, 0.2)])[-1]
    assert (last.verdict, last.act) == ("ok", False)
    assert last.reason == "held-out reward 0.2 below its best, but the training reward did not rise"


def test_a_fall_within_tolerance_is_ok():
    """0.8 - 0.76 = 0.04 <= 0.05 while training rises: within tolerance."""
    last = _stream(HackingDetector(tolerance=0.05), [(0.8, 1.0, None), (0.76, 1.0, 0.3), (0.76, 1.0, 0.9)])[-1]
    assert last.verdict == "ok" and last.reason == "held-out reward within tolerance of its best"


def test_when_the_start_is_best_the_first_training_value_is_the_reference():
    """Best = the start (no training reward then): the reference is the first check's 0.3, so the
    first check itself cannot be hacking; the second (0.4 > 0.3, 0.8 - 0.6 = 0.2) is."""
    verdicts = _stream(HackingDetector(tolerance=0.05), [(0.8, None, None), (0.7, None, 0.3), (0.6, None, 0.4)])
    assert [v.verdict for v in verdicts] == ["ok", "ok", "hacking"]
    assert "rose to 0.4 (from 0.3)" in verdicts[-1].reason and "(step 0)" in verdicts[-1].reason


def test_diversity_collapse_is_hacking_whatever_the_rewards():
    """Start diversity 0.2; min_diversity 0.5 -> hacking below 0.1 even while held-out rises."""
    verdicts = _stream(HackingDetector(min_diversity=0.5), [(0.5, 0.2, None), (0.6, 0.11, 0.1), (0.7, 0.09, 0.2)])
    assert [v.verdict for v in verdicts] == ["ok", "ok", "hacking"]
    assert verdicts[-1].reason == "diversity 0.09 fell below 0.5 x its start 0.2"
    off = _stream(HackingDetector(min_diversity=0.0), [(0.5, 0.2, None), (0.6, 0.0, 0.1)])[-1]
    assert off.verdict == "ok"


def test_both_reasons_are_given():
    last = _stream(HackingDetector(), [(0.8, 0.2, None), (0.8, 0.2, 0.1), (0.5, 0.05, 0.4)])[-1]
    assert last.verdict == "hacking" and last.reason.count(";") == 1 and "diversity 0.05" in last.reason


def test_patience_counts_hacking_verdicts_in_a_row():
    stream = [(0.8, 1.0, None), (0.8, 1.0, 0.1), (0.5, 1.0, 0.2), (0.8, 1.0, 0.2), (0.5, 1.0, 0.3), (0.5, 1.0, 0.4)]
    verdicts = _stream(HackingDetector(patience=2), stream)
    assert [v.verdict for v in verdicts] == ["ok", "ok", "hacking", "ok", "hacking", "hacking"]
    assert [v.act for v in verdicts] == [False, False, False, False, False, True]


def test_pairwise_diversity_by_hand():
    """2 seeds x 1 prompt, 1x1x1 'images' 0.2 and 0.6 (3 channels equal): rms = 0.4. With a third
    seed at 0.6: pairs 0.4, 0.4, 0 -> mean 0.26667."""
    two = torch.tensor([0.2, 0.6]).view(2, 1, 1, 1, 1).expand(2, 1, 3, 1, 1)
    assert pairwise_diversity(two) == pytest.approx(0.4)
    three = torch.tensor([0.2, 0.6, 0.6]).view(3, 1, 1, 1, 1).expand(3, 1, 3, 2, 2)
    assert pairwise_diversity(three) == pytest.approx(0.8 / 3)
    assert torch.isnan(torch.tensor(pairwise_diversity(two[:1])))


# --- the config section ------------------------------------------------------------------------


def _config(tmp_path, name: str = "run", max_steps: int = 8, **guard):
    return {
        "method": "draft", "model": "tiny-sd", "output_dir": str(tmp_path / name), "seed": 0,
        "draft": {"reward": "brightness", "num_steps": 2, "prompts": ["a cat", "a dog"]},
        "train": {"max_steps": max_steps, "learning_rate": 1e-2, "checkpoint_every": 0},
        "lora": {"rank": 4},
        "eval": {"reward": "saturation", "num_steps": 2, "prompts": ["a cat", "a red house"]},
        "guard": {"every": 2, **guard},
    }  # fmt: skip


def test_guard_is_on_with_an_eval_reward_and_enabled_needs_one(tmp_path):
    from diffalign.config import explain_config, get_method, load_config
    from diffalign.errors import UserError
    from diffalign.guard import guard_is_on

    assert guard_is_on(load_config(_config(tmp_path)))
    assert not guard_is_on(load_config(_config(tmp_path, enabled=False)))
    no_eval = _config(tmp_path)
    no_eval.pop("eval")
    assert not guard_is_on(load_config(no_eval))
    with pytest.raises(UserError, match=r"^config error: guard.enabled=true needs eval.reward"):
        load_config({**no_eval, "guard": {"enabled": True}})
    with pytest.raises(UserError, match=r"guard.action: input should be 'warn', 'stop' or 'rollback'"):
        load_config(_config(tmp_path, action="explode"))
    keys = "\n".join(explain_config(get_method("draft")[0]))
    assert "guard.tolerance: float = 0.05" in keys and "guard.keep_best: bool = True" in keys


# --- real tiny runs: brightness hacked against held-out saturation --------------------------------


def _train(cfg_dict, overwrite: bool = False):
    from diffalign.config import get_method, load_config

    cfg = load_config(cfg_dict)
    _, trainer_cls = get_method(cfg.method)
    return cfg, trainer_cls(cfg, overwrite=overwrite).train


def _guard_records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "guard/verdict" in r]


def _heldout_of(lora_dir, cfg, reward=None) -> float:
    """``reward`` (default eval.reward) of the eval samples of a fresh ``cfg.model`` with the LoRA
    in ``lora_dir`` (None: the base model)."""
    from diffalign.lora import load_lora
    from diffalign.pipelines.loading import load_policy
    from diffalign.rewards import load_reward
    from diffalign.training import evaluate_reward

    policy = load_policy(cfg.model)
    if lora_dir is not None:
        load_lora(policy.denoiser, lora_dir)
    return evaluate_reward(policy, load_reward(reward or cfg.eval.reward), cfg.eval)


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_guard_stops_the_hacking_run_and_keeps_the_best_lora(tmp_path, action):
    """lr 1e-2 on brightness lowers saturation: the guard calls it hacking at step 6 and stops
    (of 8). final/ holds the LoRA of the best held-out check, whose saturation is the best seen."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: draft\n")  # an older run that --overwrite replaces
    cfg, train = _train(_config(tmp_path, action=action, keep_best=action == "stop"), overwrite=True)
    with pytest.raises(GuardStopped) as info:
        train()
    run_dir = tmp_path / "run"
    records = _guard_records(run_dir)
    assert [r["step"] for r in records] == [0, 2, 4, 6] and info.value.step == 6 < cfg.train.max_steps
    assert [r["guard/verdict"] for r in records] == ["ok", "ok", "ok", "hacking"]
    assert records[-1]["guard/action"] == action
    assert records[-1]["guard/train_reward"] > records[1]["guard/train_reward"]  # the trained reward rose
    best = max(r["guard/heldout_reward"] for r in records)
    assert records[-1]["guard/heldout_reward"] < best - cfg.guard.tolerance  # the held-out one fell
    assert records[-1]["guard/best_step"] == 2
    assert records[0]["guard/drift"] == 0.0 < records[1]["guard/drift"] < records[-1]["guard/drift"]  # B starts at 0
    assert info.value.final == run_dir / "final" and (run_dir / "last").is_dir()
    assert not list(tmp_path.glob(".run*"))  # the --overwrite staging folder was moved into place
    assert _heldout_of(run_dir / "final", cfg) == pytest.approx(best, abs=1e-6)
    assert "<td class='hacking'>hacking</td>" in (run_dir / "report.html").read_text()


def test_warn_trains_to_the_end_and_keep_best_chooses_the_final_lora(tmp_path):
    from diffalign.lora import lora_state_dict, load_lora
    from diffalign.pipelines.loading import load_policy

    cfg, train = _train(_config(tmp_path, "best", max_steps=8, action="warn"))
    train()
    records = _guard_records(tmp_path / "best")
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    log = (tmp_path / "best" / "log.txt").read_text()
    assert "guard: 1 of the 2 eval.prompts are also training prompts (e.g. 'a cat')" in log
    assert "guard: held-out saturation and diversity on 2 prompts x 2 seeds every 2 steps; action warn" in log
    assert [r["guard/action"] for r in records if r["guard/verdict"] == "hacking"] == ["warn", "warn"]
    assert _heldout_of(tmp_path / "best" / "final", cfg) == pytest.approx(records[-1]["guard/best_heldout"], abs=1e-6)

    # keep_best false: final/ is the last weights, no last/
    _, train = _train(_config(tmp_path, "last", max_steps=8, action="warn", keep_best=False))
    train()
    assert not (tmp_path / "last" / "last").exists()
    finals = []
    for folder in (tmp_path / "best" / "last", tmp_path / "last" / "final"):
        policy = load_policy("tiny-sd")
        load_lora(policy.denoiser, folder)
        finals.append(lora_state_dict(policy.denoiser))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # the same run's last weights


# --- the hacking run on the shapes world ---------------------------------------------------------


# Two proxies DRaFT over-optimises on shapes-sd while the gold shapes_geneval (partial credit) on
# held-out prompts falls:
# - brightness, a rule, at a deliberately high learning rate (1e-2): the boards wash out;
# - the learned shapes_pref at the draft/shapes-sd.yaml recipe's settings (CFG 1.5) but lr 2e-3.
#   Measured with one thread on the shapes-sd of the pair-level split (guard every 5 steps, warn):
#   held-out gold 0.469 (base) -> 0.562 (step 5) -> 0.453 (step 20, the training shapes_pref
#   0.723 above its 0.682 at step 5: hacking) -> 0.391 (step 25). At the recipe's lr 1e-3 the gold
#   also fell (0.531 at step 5 -> 0.375 at step 40) but the training shapes_pref never rose above
#   its step-5 value, so the guard rightly did not call it hacking.
SHAPES_HACKING_RUNS = {
    "brightness": ({"num_steps": 6, "guidance_scale": 4.0}, {"max_steps": 12, "learning_rate": 1e-2}, 6, 2, 0.01),
    "shapes_pref": ({"num_steps": 10, "guidance_scale": 1.5, "noise_level": 0.0},
                    {"max_steps": 40, "learning_rate": 2e-3, "max_grad_norm": 1.0}, 8, 5, 0.008),
}  # proxy: (draft settings, train settings, held-out prompts, guard.every, least rise of the proxy)


@pytest.mark.parametrize("proxy", list(SHAPES_HACKING_RUNS))
def test_guard_stops_reward_hacking_on_the_shapes_world(tmp_path, proxy):
    """The guard calls the run hacking (training reward up, held-out gold down by more than the
    tolerance) and stops it before its last step; on the held-out prompts' samples the proxy
    went up; final/ holds a LoRA whose gold reward is at least the best seen during training."""
    from diffalign.rewards.shapes_world import ALIGN_EVAL_PROMPTS, ALIGN_TRAIN_PROMPTS

    draft, train_settings, num_prompts, every, least_rise = SHAPES_HACKING_RUNS[proxy]
    sampling = {"num_steps": draft["num_steps"], "guidance_scale": draft["guidance_scale"]}
    cfg, train = _train({
        "method": "draft", "model": "shapes-sd", "output_dir": str(tmp_path / "run"), "seed": 0,
        "draft": {"reward": proxy, "prompts": list(ALIGN_TRAIN_PROMPTS), "k": 1, "checkpoint_steps": False, **draft},
        "train": {"batch_size": 4, "lr_scheduler": "constant", "checkpoint_every": 0, **train_settings},
        "lora": {"rank": 8, "alpha": 16},
        "eval": {"reward": "shapes_geneval:partial=true", "prompts": list(ALIGN_EVAL_PROMPTS)[:num_prompts],
                 "num_images_per_prompt": 2, **sampling},
        "guard": {"every": every, "action": "stop"},
    })  # fmt: skip
    with pytest.raises(GuardStopped) as info:
        train()
    run_dir = tmp_path / "run"
    checks = _guard_records(run_dir)
    assert info.value.step < cfg.train.max_steps and checks[-1]["guard/verdict"] == "hacking"
    assert _heldout_of(run_dir / "last", cfg, proxy) > _heldout_of(None, cfg, proxy) + least_rise
    heldout = [r["guard/heldout_reward"] for r in checks]
    assert heldout[-1] < max(heldout) - cfg.guard.tolerance  # the gold reward went down
    assert _heldout_of(run_dir / "final", cfg) >= max(heldout) - 1e-6
