"""grpo.async_scoring: each sampler call's images are scored on a worker thread while the next
call samples; the run must equal the one that scores the round after sampling, to the bit."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from diffalign.config import get_method, load_config
from diffalign.errors import UserError

PROMPTS = ["a red cube", "a cat", "a blue ball"]


def _run(tmp_path, name, method, async_scoring, reward, **section):
    out = tmp_path / name
    cfg = load_config({
        "method": method, "model": "tiny-flux", "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": 2, "learning_rate": 3e-2, "batch_size": 4, "checkpoint_every": 0,
                  "lr_scheduler": "constant"},
        method: {"reward": reward, "prompts": PROMPTS, "num_steps": 2, "group_size": 2, "prompts_per_round": 4,
                 "sample_batch_size": 4, "async_scoring": async_scoring, **section},
        "logging": {"sample_every": 0},
    })
    get_method(method)[1](cfg, overwrite=True).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lora = safetensors.torch.load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    return [r for r in records if "loss" in r], lora


@pytest.mark.parametrize("method,reward,section", [
    ("grpo", {"composite": {"brightness": 1.0, "saturation": 0.5}}, {}),  # split into parts (per-reward advantages)
    ("pref_grpo", "brightness", {"pointwise_rewards": {"saturation": 0.5}}),  # a judge's compare + a pointwise reward
])
def test_async_scoring_gives_the_same_run(tmp_path, method, reward, section):
    sync_records, sync_lora = _run(tmp_path, "sync", method, False, reward, **section)
    async_records, async_lora = _run(tmp_path, "async", method, True, reward, **section)
    assert len(sync_records) == len(async_records) == 2
    for a, b in zip(sync_records, async_records):
        assert {k: v for k, v in a.items() if k not in ("time", "elapsed")} == \
               {k: v for k, v in b.items() if k not in ("time", "elapsed")}
    assert sync_lora.keys() == async_lora.keys()
    assert all(torch.equal(sync_lora[k], async_lora[k]) for k in sync_lora)


def test_async_scoring_needs_whole_groups_per_sampler_call():
    with pytest.raises(UserError, match=r"grpo.async_scoring scores whole groups per sampler call: set "
                                        r"grpo.sample_batch_size to a multiple of grpo.group_size = 2 \(it is 3\)"):
        load_config({"method": "grpo", "model": "tiny-flux", "train": {"batch_size": 4},
                     "grpo": {"reward": "brightness", "group_size": 2, "prompts_per_round": 2,
                              "sample_batch_size": 3, "async_scoring": True}})
