"""GRPO / Pref-GRPO options that match the reference code (issue 10) and today's Flow-GRPO practice
(issue 13): advantage normalisation and per-prompt stat tracking, multi-reward aggregation (GDPO),
the KL forms, which steps are trained, the SDE window, CPS, GRPO-Guard's ratio normalisation, the
static schedule shift; each against numbers worked out by hand or from the reference formula,
then on the tiny models, where the reward of images *sampled* from the trained LoRA must rise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffalign.losses import gaussian_mean_kl, grpo_loss, ratio_normalised_log_ratio, squared_error_log_ratio
from diffalign.pipelines.samplers import flow_static_shift_sigmas
from diffalign.trainers.grpo_maths import (
    aggregate_advantages,
    candidate_steps,
    group_advantages,
    per_prompt_advantages,
    place_sde_window,
    select_train_steps,
)

# --- advantages --------------------------------------------------------------------------------


def test_group_advantages_unbiased_std_as_pref_grpo():
    """Pref-GRPO (rewards/dispatcher.py ``_compute_adv``): torch's unbiased std + 1e-8. Rewards
    [1, 2, 3]: unbiased std = 1, so A = (-1, 0, 1) / (1 + 1e-8); the population std (Flow-GRPO)
    sqrt(2/3) gives +-1.2245949 (with 1e-4)."""
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(group_advantages(rewards, eps=1e-8, std="unbiased"), torch.tensor([[-1.0, 0.0, 1.0]]))
    torch.testing.assert_close(group_advantages(rewards), torch.tensor([[-1.2245949, 0.0, 1.2245949]]))


def test_per_prompt_stat_tracking_reproduces_the_reference_example():
    """Flow-GRPO flow_grpo/stat_tracking.py's own example: prompts a b a c b a, rewards 1..6.
    Prompt a pools (1, 3, 6): mean 3.3333, population std 2.0548 -> (-1.1354947, -0.1622135,
    1.2977082); b pools (2, 5): mean 3.5, std 1.5 -> -+1.5 / 1.5001 = -+0.9999333; c alone -> 0.
    With distinct prompts it is the per-group normalisation."""
    rewards = torch.arange(1.0, 7.0).view(6, 1)
    advantages = per_prompt_advantages(rewards, list("abacba"))
    expected = torch.tensor([-1.1354947, -0.9999333, -0.1622135, 0.0, 0.9999333, 1.2977082]).view(6, 1)
    torch.testing.assert_close(advantages, expected)
    groups = torch.tensor([[1.0, 2.0, 4.0], [0.0, 5.0, 5.0]])
    torch.testing.assert_close(per_prompt_advantages(groups, ["x", "y"]), group_advantages(groups))
    # global_std: every prompt's mean, the round's std
    round_std = groups.std(unbiased=False)
    torch.testing.assert_close(per_prompt_advantages(groups, ["x", "y"], global_std=True),
                               (groups - groups.mean(dim=1, keepdim=True)) / (round_std + 1e-4))


def test_aggregation_reward_sum_advantage_sum_and_gdpo_by_hand():
    """Two rewards, weights 0.4 / 0.6, unbiased std + 1e-8 (Pref-GRPO). Group 0: r1 = (0, 1),
    r2 = (2, 0); group 1 constant (1, 1) and (3, 3).
        per reward:    A1 = (-0.7071068, 0.7071068), A2 = (0.7071068, -0.7071068); group 1: 0
        advantage_sum: 0.4 A1 + 0.6 A2 = (0.1414214, -0.1414214), (0, 0)
        gdpo:          / unbiased std of those four = sqrt(0.04 / 3) = 0.1154701 -> +-1.2247449
        reward_sum:    0.4 r1 + 0.6 r2 = (1.2, 0.4) -> +-0.7071068
    """
    r1 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    r2 = torch.tensor([[2.0, 0.0], [3.0, 3.0]])
    rewards, weights = {"judge": r1, "clip": r2}, {"judge": 0.4, "clip": 0.6}

    def normalise(r):
        return group_advantages(r, eps=1e-8, std="unbiased")

    options = dict(eps=1e-8, std="unbiased")
    torch.testing.assert_close(aggregate_advantages(rewards, weights, "advantage_sum", normalise, **options),
                               torch.tensor([[0.1414214, -0.1414214], [0.0, 0.0]]))
    torch.testing.assert_close(aggregate_advantages(rewards, weights, "gdpo", normalise, **options),
                               torch.tensor([[1.2247449, -1.2247449], [0.0, 0.0]]))
    torch.testing.assert_close(aggregate_advantages(rewards, weights, "reward_sum", normalise, **options),
                               torch.tensor([[0.7071068, -0.7071068], [0.0, 0.0]]))
    torch.testing.assert_close(aggregate_advantages(rewards, weights, "gdpo", normalise, clip_max=1.0, **options),
                               torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


# --- losses ------------------------------------------------------------------------------------


def test_kl_forms_paper_and_flow_grpo():
    """Means (1, 2) vs (0, 0), std 0.5: the paper's per-step KL = mean(1, 4) / (2 * 0.25) = 5. Flow-GRPO's
    code divides by g^2 = std^2 / dt instead, i.e. 5 * dt: with dt = 0.25, 1.25."""
    mean_p, mean_q = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    assert gaussian_mean_kl(mean_p, mean_q, 0.5).item() == pytest.approx(5.0)
    assert gaussian_mean_kl(mean_p, mean_q, 0.5, dt=0.25).item() == pytest.approx(1.25)
    torch.testing.assert_close(gaussian_mean_kl(mean_p.repeat(2, 1), mean_q.repeat(2, 1), 0.5, dt=torch.tensor([0.25, 0.5])),
                               torch.tensor([1.25, 2.5]))


def test_ratio_normalisation_by_hand():
    """One element, sampled x = old_mean + std z with old_mean = 0, std = 0.5, z = 1; the new mean
    is 0.1. log_prob - old = -(0.4^2 - 0.5^2) / (2 * 0.25) = 0.18; bias = 0.1^2 / 0.5 = 0.02;
    normalised log r = 0.5 * (0.18 + 0.02) = 0.1 = z * (mean - old_mean)."""
    x, old_mean, mean, std = torch.full((1, 1), 0.5), torch.zeros(1, 1), torch.full((1, 1), 0.1), 0.5
    log_p = -((x - mean) ** 2).mean(1) / (2 * std**2)
    old = -((x - old_mean) ** 2).mean(1) / (2 * std**2)
    assert ratio_normalised_log_ratio(log_p, old, mean, old_mean, std).item() == pytest.approx(0.1, abs=1e-7)


def test_cps_squared_error_log_ratio_as_flow_grpo():
    """The same element: Flow-GRPO's CPS log-prob -(x - mean)^2 gives log r = -(0.4^2) + 0.5^2 = 0.09;
    from the Gaussian log-ratio 0.18 with std 0.5: 2 * 0.25 * 0.18 = 0.09. Per sample with std [B, 1, 1, 1]."""
    x, old_mean, mean, std = torch.full((1, 1), 0.5), torch.zeros(1, 1), torch.full((1, 1), 0.1), 0.5
    log_p = -((x - mean) ** 2).mean(1) / (2 * std**2)
    old = -((x - old_mean) ** 2).mean(1) / (2 * std**2)
    assert squared_error_log_ratio(log_p, old, std).item() == pytest.approx(0.09, abs=1e-7)
    stds = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(squared_error_log_ratio(torch.tensor([0.18, 0.18]), torch.zeros(2), stds),
                               torch.tensor([0.09, 0.36]))


def test_grpo_guard_normalised_ratio_has_mean_one_at_every_step():
    """A synthetic batch of 4096 chains x 16 elements at two steps, std 1.0 and 0.05, the policy's
    mean moved by d = 0.01 per element. The plain ratio exp(mean(z d) / std - d^2 / (2 std^2)) has
    mean exp(-0.02 + 0.00125) = 0.981 at the low-noise step (GRPO-Guard's drift below 1); the
    normalised one, exp(mean(z d)), has mean 1 within 1e-3 at both steps."""
    gen = torch.Generator().manual_seed(0)
    old_mean = torch.randn(4096, 16, generator=gen)
    mean = old_mean + 0.01
    for std, raw_expected in ((1.0, 1.0), (0.05, 0.981)):
        x = old_mean + std * torch.randn(4096, 16, generator=gen)
        log_p = -((x - mean) ** 2).mean(1) / (2 * std**2)
        old = -((x - old_mean) ** 2).mean(1) / (2 * std**2)
        raw = torch.exp(log_p - old).mean().item()
        normalised = torch.exp(ratio_normalised_log_ratio(log_p, old, mean, old_mean, std)).mean().item()
        assert raw == pytest.approx(raw_expected, abs=2e-3)
        assert normalised == pytest.approx(1.0, abs=1e-3)


def test_grpo_loss_with_replacement_log_ratio_and_step_weight():
    """log_ratio (0, log 1.5), A = (1, -1), clip 0.2, weights (2, 4): the terms are
    max(-1, -1) = -1 and max(1.5, 1.2) = 1.5; loss = mean(2 * -1, 4 * 1.5) = 2.0."""
    loss, metrics = grpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2,
                              log_ratio=torch.tensor([0.0, math.log(1.5)]), policy_weight=torch.tensor([2.0, 4.0]))
    assert loss.item() == pytest.approx(2.0) and float(metrics["ratio"]) == pytest.approx(1.25)
    assert float(metrics["approx_kl"]) == 0.0  # still to the sampling policy


# --- which steps are trained ---------------------------------------------------------------------


def test_train_step_selection_matches_each_reference():
    """Flow-GRPO (T = 6, fraction 0.99): int(5.94) = 5 steps, the first five, in order. Pref-GRPO
    (T = 25, ignore_last, fraction 0.6): the last step is dropped, int(0.6 * 24) = 14 random steps
    per sample, none the last. random_per_batch: one sorted subset shared by the micro-batch."""
    gen = torch.Generator().manual_seed(0)
    first = select_train_steps(candidate_steps(6), 0.99, "first", 3, gen)
    assert first.tolist() == [[0, 1, 2, 3, 4]] * 3
    per_sample = select_train_steps(candidate_steps(25, ignore_last=True), 0.6, "random_per_sample", 4, gen)
    assert per_sample.shape == (4, 14) and int(per_sample.max()) <= 23
    assert all(len(set(row)) == 14 for row in per_sample.tolist()) and len({tuple(r) for r in per_sample.tolist()}) == 4
    shared = select_train_steps(candidate_steps(10), 0.5, "random_per_batch", 3, gen)
    assert shared.shape == (3, 5) and (shared == shared[0]).all() and shared[0].tolist() == sorted(shared[0].tolist())
    assert candidate_steps(6, ignore_last=True, window=(3, 6)) == [3, 4]
    with pytest.raises(ValueError, match="no sampler step left"):
        candidate_steps(1, ignore_last=True)


def test_sde_window_placement_random_and_sliding():
    """Flow-GRPO-Fast: window of 3 with range (0, T // 2 = 5) -> starts 0, 1 or 2. Sliding (MixGRPO):
    round r starts at r mod 3."""
    gen = torch.Generator().manual_seed(0)
    starts = {place_sde_window(10, 3, "random", (0, 5), 0, gen)[0] for _ in range(60)}
    assert starts == {0, 1, 2}
    assert [place_sde_window(10, 3, "sliding", (0, 5), r, gen) for r in range(4)] == [(0, 3), (1, 4), (2, 5), (0, 3)]
    assert place_sde_window(10, 0, "random", None, 0, gen) is None
    with pytest.raises(ValueError, match="does not fit"):
        place_sde_window(4, 5, "random", None, 0, gen)


def test_static_schedule_shift_by_hand():
    """Pref-GRPO's sd3_time_shift with shift 3 on linspace(1, 0, 5): 3s / (1 + 2s) = 1, 0.9, 0.75, 0.5, 0."""
    torch.testing.assert_close(flow_static_shift_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(flow_static_shift_sigmas(2, 1.0), torch.tensor([1.0, 0.5, 0.0]))


# --- config ------------------------------------------------------------------------------------


def _config(method="grpo", model="tiny-flux", train=None, **section):
    from diffalign.config import load_config

    return load_config({"method": method, "model": model, "train": train or {},
                        method: {"reward": "brightness", **section}})


def test_defaults_are_unchanged_and_bad_options_are_one_line_errors():
    from diffalign.errors import UserError

    s = _config().grpo
    assert (s.timestep_selection, s.ignore_last, s.advantage_std, s.advantage_eps, s.kl_form, s.sde_type,
            s.sde_window_size, s.ratio_norm, s.per_prompt_stat_tracking, s.advantage_aggregation,
            s.schedule_shift) == ("random_per_batch", False, "population", 1e-4, "paper", "sde", 0, False, False,
                                  "reward_sum", None)
    with pytest.raises(UserError, match="sde_window_size 5 must fit in sde_window_range"):
        _config(num_steps=4, sde_window_size=5)
    with pytest.raises(UserError, match="cps_log_prob: flow_grpo needs sde_type: cps"):
        _config(cps_log_prob="flow_grpo")
    with pytest.raises(UserError, match="grpo.kl_form"):
        _config(kl_form="schulman")
    with pytest.raises(UserError, match=r"grpo.ignore_last: it drops the last sampler step, which is the only one"):
        _config(num_steps=1, ignore_last=True)
    with pytest.raises(UserError, match=r"a 1-step grpo.sde_window can be placed on; set grpo.ignore_last=false or "
                                        r"end grpo.sde_window_range before step 3"):
        _config(num_steps=4, ignore_last=True, sde_window_size=1)
    with pytest.raises(UserError, match=r"pref_grpo.pointwise_rewards: unknown reward 'brightnes'"):
        _config(method="pref_grpo", pointwise_rewards={"brightnes": 1.0})


@pytest.mark.parametrize("option,message", [
    ({"sde_type": "cps"}, "grpo.sde_type: 'cps' needs a flow-matching model; the sd family has sde"),
    ({"schedule_shift": 3.0}, "grpo.schedule_shift: the sd family has no flow schedule"),
    ({"max_sequence_length": 128}, "grpo.max_sequence_length: the sd family has no T5"),
])
def test_flow_only_options_on_sd_end_before_sampling(tmp_path, option, message):
    from diffalign.errors import UserError
    from diffalign.trainers.pref_grpo import GRPOTrainer

    cfg = _config(model="tiny-sd", train={"batch_size": 8}, **option)
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match=message):
        GRPOTrainer(cfg, overwrite=True).train()


# --- on the tiny models --------------------------------------------------------------------------

PROMPTS = ["a red cube", "a cat"]


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_built():
    from diffalign.pipelines.tiny import TINY_MODELS, tiny_model_dir

    for name in TINY_MODELS:
        tiny_model_dir(name)


def _train(tmp_path, method, model, section, *, steps, lr, batch, num_steps, record=None):
    """Train on a tiny model with a brightness reward (eval: brightness of images sampled with
    fixed seeds before and after); ``record`` collects the (step index, batch size) of every
    training pass. Returns the metrics records."""
    from diffalign.config import get_method, load_config
    from diffalign.trainers.pref_grpo import GRPOTrainer

    out = tmp_path / "run"
    section = dict(section)
    eval_guidance = section.pop("eval_guidance_scale", None)
    cfg = load_config({
        "method": method, "model": model, "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": steps, "learning_rate": lr, "batch_size": batch, "checkpoint_every": 0,
                  "lr_scheduler": "constant"},
        method: {"reward": "brightness", "prompts": PROMPTS, "num_steps": num_steps, **section},
        "eval": {"reward": "brightness", "prompts": PROMPTS, "num_steps": num_steps, "num_images_per_prompt": 2,
                 "guidance_scale": eval_guidance},
    })
    trainer = get_method(method)[1](cfg, overwrite=True)
    if record is not None:
        original = GRPOTrainer.grpo_step.__get__(trainer)

        def recording(policy, trajectory, advantages, step, **kwargs):
            record.append((step if isinstance(step, int) else tuple(step.tolist()), trajectory.sde_window))
            return original(policy, trajectory, advantages, step, **kwargs)

        trainer.grpo_step = recording
    trainer.train()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# (method, model, options, optimizer steps, lr): each raises the brightness of sampled images.
# Measured eval brightness after - before (seed 0): see the assertion message when it fails.
OPTION_RUNS = [
    # Flow-GRPO-Fast style: CPS (the reference's squared-error log-ratio) inside a random 2-step
    # window, first-steps selection, the reference KL form, per-prompt stat tracking, the round's std
    ("grpo", "tiny-flux", {"sde_type": "cps", "cps_log_prob": "flow_grpo", "noise_level": 0.8, "sde_window_size": 2,
                           "sde_window_range": [0, 3],
                           "timestep_selection": "first", "kl_beta": 0.01, "kl_form": "flow_grpo",
                           "per_prompt_stat_tracking": True, "global_std": True, "group_size": 8,
                           "prompts_per_round": 2}, 8, 3e-2),
    # Pref-GRPO's current defaults: ratio normalisation, random steps per sample without the last,
    # unbiased std + 1e-8, static shift 3, win rate + a pointwise reward aggregated by GDPO (every
    # candidate step, in a per-chain order: the reference's 0.6 leaves one of 3 steps here, too few)
    ("pref_grpo", "tiny-flux", {"ratio_norm": True, "timestep_selection": "random_per_sample", "ignore_last": True,
                                "timestep_fraction": 1.0, "advantage_std": "unbiased", "advantage_eps": 1e-8,
                                "schedule_shift": 3.0, "win_rate_weight": 0.4, "pointwise_rewards": {"brightness": 0.6},
                                "advantage_aggregation": "gdpo", "group_size": 8, "prompts_per_round": 2}, 8, 3e-2),
    # SD3: a 2-step window of the flow SDE, CFG-free (sampled and trained at CFG 1, evaluated at
    # CFG 1 as the reference's no-CFG configs do); measured +0.158 (CPS here: +0.014)
    ("grpo", "tiny-sd3", {"noise_level": 0.7, "sde_window_size": 2, "sde_window_range": [0, 3],
                          "timestep_selection": "first", "guidance_scale": 1.0, "per_prompt_stat_tracking": True,
                          "group_size": 8, "prompts_per_round": 2, "eval_guidance_scale": 1.0}, 8, 3e-2),
    # DDIM families: a sliding window of DDIM-eta steps, eta 0 outside
    ("grpo", "tiny-sd", {"sde_window_size": 1, "sde_window_placement": "sliding", "group_size": 4,
                         "prompts_per_round": 4}, 8, 2e-2),
]


@pytest.mark.parametrize("method,model,section,steps,lr", OPTION_RUNS)
def test_options_train_and_raise_the_reward_of_sampled_images(tmp_path, method, model, section, steps, lr):
    record = []
    num_steps = 4 if model in ("tiny-flux", "tiny-sd3") else 2
    batch = section["group_size"] * section["prompts_per_round"]
    if section.get("guidance_scale") == 1.0:  # CFG-free: the round is encoded without a negative branch
        from diffalign.config import load_config
        from diffalign.pipelines.loading import load_policy
        from diffalign.trainers.pref_grpo import GRPOTrainer

        cfg = load_config({"method": method, "model": model, "train": {"batch_size": batch},
                           method: {"reward": "brightness", **{k: v for k, v in section.items() if k != "eval_guidance_scale"}}})
        assert GRPOTrainer(cfg).round_conditioning(load_policy(model), ["a cat"]).uncond is None
    records = _train(tmp_path, method, model, section, steps=steps, lr=lr, batch=batch, num_steps=num_steps,
                     record=record)
    evals = [r["eval/brightness"] for r in records if "eval/brightness" in r]
    assert evals[1] > evals[0] + 0.02, f"eval brightness {evals[0]:.5f} -> {evals[1]:.5f}"
    train = [r for r in records if "loss" in r]
    assert len(train) == steps
    # every update is the first of its round: on-policy, the recomputed log-probs equal the sampling-time ones
    assert all(r["approx_kl"] < 1e-9 and r["ratio"] == pytest.approx(1.0, abs=1e-6) for r in train)
    window = section.get("sde_window_size", 0)
    if window:
        # only the window's steps are trained, each round's window where the placement puts it
        assert all(w is not None and w[1] - w[0] == window and w[0] <= s < w[1] for s, w in record if isinstance(s, int))
        if section.get("sde_window_placement") == "sliding":
            starts = [w[0] for _, w in record]
            assert starts[: steps] == [r % (num_steps - window + 1) for r in range(steps)]
    if section.get("timestep_selection") == "random_per_sample":
        assert any(not isinstance(s, int) for s, _ in record)  # chains of a batch train different steps
        assert all(max(s if isinstance(s, tuple) else (s,)) < num_steps - 1 for s, _ in record)  # ignore_last
    if method == "pref_grpo":
        assert "reward/win_rate" in train[0] and "reward/brightness" in train[0]


def test_grpo_continues_an_init_lora_against_the_chosen_reference(tmp_path):
    """GRPO goes through the shared add-LoRA path: a run started from ``init_lora`` = another run's
    final LoRA evaluates, before its first update, exactly what that run's final LoRA evaluated
    after training; with the base as reference its first step already has a KL > 0 (the policy is
    base + LoRA), with ``reference: init`` the first KL is 0."""
    from diffalign.config import load_config
    from diffalign.trainers.pref_grpo import GRPOTrainer

    def run(name, steps, **top):
        out = tmp_path / name
        GRPOTrainer(load_config({
            "method": "grpo", "model": "tiny-flux", "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
            "train": {"max_steps": steps, "learning_rate": 5e-2, "batch_size": 8, "checkpoint_every": 0},
            "grpo": {"reward": "brightness", "prompts": PROMPTS, "num_steps": 2, "group_size": 8, "kl_beta": 0.1},
            "eval": {"reward": "brightness", "prompts": PROMPTS, "num_steps": 2, "num_images_per_prompt": 1},
            "guard": {"enabled": False},  # final/ is the last step's LoRA
            **top,
        }), overwrite=True).train()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    first = run("first", 3)
    final = str(tmp_path / "first" / "final")
    for reference, kl_positive in (("base", True), ("init", False)):
        records = run(f"continued-{reference}", 1, init_lora=final, reference=reference)
        after = [r["eval/brightness"] for r in first if "eval/brightness" in r][-1]
        assert records[0]["eval/brightness"] == pytest.approx(after, abs=1e-6)
        step = next(r for r in records if "loss" in r)
        assert (step["kl_ref"] > 1e-6) is kl_positive, (reference, step["kl_ref"])
