"""bench/methods.py --quick on the tiny models (2 seeds): the table's columns, one row per method, the
curve PNG and the results file (its numbers are not asserted: random tiny denoisers)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "methods.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_methods", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_methods"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_methods_table_on_tiny_models(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench"
    assert bench.main(["--size", "tiny", "--device", "cpu", "--quick", "--methods", "grpo,draft", "--budget", "50", "--seeds", "2",
                       "--out", str(out)]) == 0
    lines = (out / "methods.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| family"))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == bench.COLUMNS
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:] if line.startswith("|")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("sd", "grpo", "`brightness`"), ("sd", "draft", "`saturation`")]
    for row in rows:
        assert all(" -> " in row[i] and " ± " in row[i] for i in (5, 6, 7))  # before -> after, mean ± std of 2 seeds
        assert float(row[4]) > 0 and int(row[3]) >= 1
    assert "budget 50 denoiser forward-pass equivalents" in lines[0] and "backward = 2" in lines[0]
    png = (out / "methods.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    for result in results["results"]:
        assert [run["seed"] for run in result["runs"]] == [0, 1]
        for run in result["runs"]:
            assert run["curve"][0][0] == 0 and len(run["curve"]) >= 2  # the base, then checks along the run
            assert [c for c, _ in run["curve"]] == sorted(c for c, _ in run["curve"])


def test_counter_counts_images_and_backward_as_two():
    """A tiny UNet called on a batch of 3 without grad -> 3; with a LoRA and a backward -> 3 + 3 x 3 = 12."""
    import torch

    from diffalign import lora
    from diffalign.config import LoraSettings
    from diffalign.pipelines.loading import load_policy

    bench = _bench()
    policy = load_policy("tiny-sd")
    lora.add_lora(policy.denoiser, policy.family, LoraSettings(rank=2))
    cond = policy.encode_prompts(["a", "b", "c"], with_uncond=False)
    x = policy.initial_noise(3, 64, 64, torch.Generator().manual_seed(0))
    t = policy.schedule(2, 64, 64)[0][0]
    with bench.DenoiserCounter() as counter:
        with torch.no_grad():
            policy.predict(x, t, cond, guidance_scale=1.0)
        assert counter.count == 3
        policy.predict(x, t, cond, guidance_scale=1.0).sum().backward()
        assert counter.count == 12
        counter.paused = True
        policy.predict(x, t, cond, guidance_scale=1.0)
    assert counter.count == 12
