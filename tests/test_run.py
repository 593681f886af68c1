"""Run machinery on a toy problem: exact resume, atomic checkpoints, run-folder rules, metrics,
pruning, and two real processes (gloo on the CPU) kept in sync by sync_gradients. What protects a
user's work (--overwrite, torn metrics, resuming an older step, full disks) is in
test_run_work_kept.py.

This file is also the two-process worker: ``accelerate launch ... tests/test_run.py OUT``.
"""

from __future__ import annotations

from conftest import run_two_processes

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import diffalign.checkpoint as checkpoint_module
from diffalign.config import TrainSettings
from diffalign.errors import UserError
from pydantic import ValidationError
from diffalign.optim import clip_gradients
from diffalign.run import Run, TrainingState
from run_toys import ToyProblem, read_metrics, toy_config


def test_resume_is_bitwise_identical_to_straight_run(tmp_path):
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    cfg = toy_config(straight_dir)
    run = Run(cfg)
    straight = ToyProblem(cfg.train)
    straight.train(run, 0, 6)
    run.finish()

    # Interrupted run: checkpoint at 3, dies after logging step 4.
    cfg = toy_config(split_dir)
    run = Run(cfg)
    first = ToyProblem(cfg.train)
    first.train(run, 0, 4)
    run.finish()
    assert [p.name for p in run.checkpoints()] == ["step-3"]

    run = Run(cfg.model_copy(update={"resume": "latest"}))
    resumed = ToyProblem(cfg.train, init_seed=99)  # different init: restore must overwrite it
    step = run.restore(resumed.state)
    assert step == 3 and resumed.state.data_state == {"seen": 24}
    resumed.train(run, step, 6)
    run.finish()

    a, b = straight.snapshot(), resumed.snapshot()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.state.data_state == {"seen": 48}
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    # metrics.jsonl reads as one run: step 4 of the dead run was dropped and logged again.
    assert [m["step"] for m in read_metrics(split_dir)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in read_metrics(split_dir)] == [m["loss"] for m in read_metrics(straight_dir)]
    assert [p.name for p in run.checkpoints()] == ["step-3", "step-6"]
    files = sorted(p.name for p in (split_dir / "checkpoints" / "step-6").iterdir())
    assert files == ["extra.safetensors", "lora.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_the_step_with_a_checkpoint(tmp_path, signum):
    """SIGTERM (a scheduler's preemption) or Ctrl-C during step 2 finishes step 2, checkpoints it
    (checkpoint_every is 3) and stops with how to resume; resuming gives the straight run bitwise."""
    before = signal.getsignal(signum)
    run = Run(toy_config(tmp_path / "straight"))
    straight = ToyProblem(run.cfg.train)
    straight.train(run, 0, 6)
    run.finish()

    cfg = toy_config(tmp_path / "stopped")
    run = Run(cfg)
    stopped = ToyProblem(cfg.train)
    stopped.train(run, 0, 1)
    os.kill(os.getpid(), signum)  # arrives during step 2
    name = signal.Signals(signum).name
    with pytest.raises(UserError, match=rf"stopped by {name} after step 2; .*step-2 holds it: continue with resume=latest"):
        stopped.train(run, 1, 6)
    assert signal.getsignal(signum) == before  # finish() put the handler back
    assert [p.name for p in run.checkpoints()] == ["step-2"]

    run = Run(cfg.model_copy(update={"resume": "latest"}))
    resumed = ToyProblem(cfg.train, init_seed=99)
    resumed.train(run, run.restore(resumed.state), 6)
    run.finish()
    a, b = straight.snapshot(), resumed.snapshot()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_files_load_weights_only(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=3)
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    problem.train(run, 0, 3)
    run.finish()
    folder = tmp_path / "run" / "checkpoints" / "step-3"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)  # no pickle of arbitrary objects
    stored = safetensors.torch.load_file(str(folder / "lora.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in problem.params.items())
    info = json.loads((folder / "state.json").read_text())
    assert info["config"] == cfg.model_dump(mode="json")  # what ran, for a resume to compare with
    assert {k: v for k, v in info.items() if k != "config"} == {"step": 3, "num_processes": 1, "data_state": {"seen": 24}}


@pytest.mark.parametrize("form", ["list", "callables"])
def test_params_as_list_or_state_callables(tmp_path, form):
    weights = [torch.nn.Parameter(torch.arange(3.0)), torch.nn.Parameter(torch.ones(2, 2))]
    if form == "list":
        params = weights
    else:
        params = (
            lambda: {"a": weights[0].detach().clone(), "b": weights[1].detach().clone()},
            lambda state: [w.data.copy_(state[k]) for w, k in zip(weights, "ab")],
        )
    run = Run(toy_config(tmp_path / "run"))
    state = TrainingState(params=params, data_state={"epoch": 2})
    run.checkpoint(5, state)
    with torch.no_grad():
        for w in weights:
            w.mul_(-1)
    state.data_state["epoch"] = 9
    run.finish()
    run = Run(toy_config(tmp_path / "run").model_copy(update={"resume": "latest"}))
    assert run.restore(state) == 5
    assert torch.equal(weights[0], torch.arange(3.0)) and torch.equal(weights[1], torch.ones(2, 2))
    assert state.data_state == {"epoch": 2}
    with pytest.raises(UserError, match=r"does not match this run's trainable weights \(0 missing, 1 unexpected"):
        run.restore(TrainingState(params=weights[:1] if form == "list" else {"a": weights[0]}))
    run.finish()


def test_process_tensors_are_saved_per_process_and_replace_the_dict_on_restore(tmp_path):
    """process_tensors (what one process holds for an update spanning steps) go to
    process-<rank>.safetensors; restoring replaces the dict's contents (other names and shapes
    than it held); a checkpoint without them, or saved by another number of processes, empties it."""
    own = {"round.latents": torch.arange(6.0).view(2, 3), "round.position": torch.tensor([1, 4])}
    weights = [torch.nn.Parameter(torch.zeros(2))]
    run = Run(toy_config(tmp_path / "run"))
    run.checkpoint(1, TrainingState(params=weights))
    run.checkpoint(2, TrainingState(params=weights, process_tensors=dict(own)))
    run.finish()
    folders = tmp_path / "run" / "checkpoints"
    assert not (folders / "step-1" / "process-0.safetensors").exists()
    stored = safetensors.torch.load_file(str(folders / "step-2" / "process-0.safetensors"))
    assert stored.keys() == own.keys() and all(torch.equal(stored[k], own[k]) for k in own)

    for step, expected in [(2, own), (1, {})]:
        out = tmp_path / f"from-{step}"  # (resuming step 1 inside "run" would set step 2 aside)
        run = Run(toy_config(out).model_copy(update={"resume": str(folders / f"step-{step}")}))
        state = TrainingState(params=weights, process_tensors={"stale": torch.zeros(5)})
        assert run.restore(state) == step
        run.finish()
        assert state.process_tensors.keys() == expected.keys()
        assert all(torch.equal(state.process_tensors[k], v) for k, v in expected.items())

    # The same files, as if saved by two processes: this one process restores none of them.
    rng = torch.load(folders / "step-2" / "rng.pt", weights_only=True)
    torch.save({"per_process": rng["per_process"] * 2}, folders / "step-2" / "rng.pt")
    (folders / "step-2" / "process-1.safetensors").write_bytes((folders / "step-2" / "process-0.safetensors").read_bytes())
    state = TrainingState(params=weights, process_tensors={"stale": torch.zeros(5)})
    run = Run(toy_config(tmp_path / "run").model_copy(update={"resume": str(folders / "step-2")}))
    run.restore(state)
    run.finish()
    assert state.process_tensors == {}


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = toy_config(tmp_path / "run")
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    problem.train(run, 0, 3)
    real_save = checkpoint_module._save_torch

    def failing_save(path, obj):
        if path.name == "scheduler.pt":
            raise OSError("device error")
        real_save(path, obj)

    monkeypatch.setattr(checkpoint_module, "_save_torch", failing_save)
    with pytest.raises(OSError, match="device error"):
        problem.train(run, 3, 6)
    run.finish()
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-3"]

    run = Run(cfg.model_copy(update={"resume": "latest"}))
    fresh = ToyProblem(cfg.train, init_seed=5)
    assert run.restore(fresh.state) == 3
    run.finish()


def test_output_dir_rules(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError) as info:
        Run(toy_config(out))
    assert str(info.value) == (
        f"output_dir {out} exists and is not empty; pass --overwrite to replace it or resume=latest to continue"
    )
    with pytest.raises(UserError, match="--overwrite would delete the checkpoint"):
        Run(toy_config(out).model_copy(update={"resume": "latest"}), overwrite=True)
    # not a diffalign run: --overwrite leaves the user's files alone
    with pytest.raises(UserError, match=r"is not a diffalign run \(no config.yaml\), so --overwrite will not replace it"):
        Run(toy_config(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]

    (out / "old.txt").unlink()
    run = Run(toy_config(out))  # an empty folder is used as it is
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert "method: toy_run" in (out / "config.yaml").read_text()
    run.finish()
    with pytest.raises(UserError, match=r"resume=latest but .* holds no checkpoint"):
        Run(toy_config(out).model_copy(update={"resume": "latest"}))
    with pytest.raises(UserError, match="resume=/nowhere: not a checkpoint"):
        Run(toy_config(out).model_copy(update={"resume": "/nowhere"}))


def test_metrics_jsonl_and_sample_grid(tmp_path):
    run = Run(toy_config(tmp_path / "run"))
    run.log(1, {"loss": torch.tensor(0.5), "accuracy": 1})
    run.log(2, {"loss": float("nan")})
    records = read_metrics(tmp_path / "run")
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {"step": 1, "loss": 0.5, "accuracy": 1.0},
        {"step": 2, "loss": None},
    ]
    assert all(isinstance(r["time"], float) for r in records)

    images = torch.zeros(4, 3, 16, 16)
    images[1] = 1.0
    path = run.sample_grid(7, images, ["a", "b", "c", "d"])
    assert path == tmp_path / "run" / "samples" / "step-000007.png"
    from PIL import Image

    grid = np.asarray(Image.open(path))
    assert grid.shape == (38, 38, 3)  # 2 x 2 tiles of 16 px with 2 px padding
    assert grid[2:18, 20:36].min() == 255 and grid[2:18, 2:18].max() == 0
    assert path.with_suffix(".txt").read_text() == "a\nb\nc\nd\n"
    run.finish()


def test_tensorboard_tracker_gets_metrics_and_samples(tmp_path):
    cfg = toy_config(tmp_path / "run")
    cfg.logging.report_to = ["tensorboard"]
    run = Run(cfg)
    run.log(1, {"loss": 0.25})
    run.sample_grid(1, torch.rand(2, 3, 8, 8), ["a", "b"])
    run.finish()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "diffalign"))  # <output_dir>/<project_name>
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [0.25]
    assert len(acc.Images("samples")) == 1


def test_precision_sets_weight_dtype_and_runs_can_follow_each_other(tmp_path):
    run = Run(toy_config(tmp_path / "a", mixed_precision="bf16"))
    assert run.weight_dtype == torch.bfloat16 and run.accelerator.mixed_precision == "bf16"
    run.finish()
    run = Run(toy_config(tmp_path / "b"))
    assert run.weight_dtype == torch.float32 and run.accelerator.mixed_precision == "no"
    run.finish()


def test_checkpoints_total_limit_prunes_oldest(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=5, checkpoint_every=1, checkpoints_total_limit=2)
    run = Run(cfg)
    ToyProblem(cfg.train).train(run, 0, 5)
    run.finish()
    assert [p.name for p in run.checkpoints()] == ["step-4", "step-5"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_only_final_checkpoint_when_every_is_zero(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=4, checkpoint_every=0)
    run = Run(cfg)
    ToyProblem(cfg.train).train(run, 0, 4)
    run.finish()
    assert [p.name for p in run.checkpoints()] == ["step-4"]


def test_sdpa_backends_limit_the_attention_kernel_for_the_run_only(tmp_path):
    """train.sdpa_backends=[math] makes torch pick the math kernel (the CPU would pick flash) while
    the Run lives; finish() puts torch's switches back."""
    from torch.nn.attention import SDPBackend

    q = torch.randn(1, 2, 8, 16)
    chosen = lambda: SDPBackend(torch._fused_sdp_choice(q, q, q))  # noqa: E731
    assert chosen() == SDPBackend.FLASH_ATTENTION
    run = Run(toy_config(tmp_path / "run", sdpa_backends="math"))  # one name is a one-item list
    assert run.cfg.train.sdpa_backends == ["math"]
    assert chosen() == SDPBackend.MATH and not torch.backends.cuda.cudnn_sdp_enabled()
    run.finish()
    assert chosen() == SDPBackend.FLASH_ATTENTION and torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(ValidationError):
        TrainSettings(sdpa_backends=[])
    with pytest.raises(ValidationError):
        TrainSettings(sdpa_backends=["fast"])


# --- two processes ---------------------------------------------------------------------------


def test_two_processes_stay_in_sync_and_only_main_writes(tmp_path):
    result = run_two_processes(__file__, str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    def load(name: str) -> dict[str, torch.Tensor]:
        # Weights and optimizer state; the toy's ema_loss follows each rank's own loss.
        tensors = safetensors.torch.load_file(str(tmp_path / name))
        return {k: v for k, v in tensors.items() if k != "ema_loss"}

    rank0, rank1, init = load("rank0.safetensors"), load("rank1.safetensors"), load("init.safetensors")
    assert len(rank0) == 8  # weight, bias and their AdamW step / exp_avg / exp_avg_sq
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    for key in init:
        assert not torch.equal(rank0[key], init[key]), key
    # The averaged gradients equal one process training on both ranks' data.
    reference = load("reference.safetensors")
    for key in rank0:
        assert torch.allclose(rank0[key], reference[key], atol=1e-6), key
    # Resuming from step 3 on both processes reproduces step 6 exactly.
    for rank in (0, 1):
        resumed = load(f"rank{rank}-resumed.safetensors")
        assert resumed.keys() == rank0.keys() and all(torch.equal(resumed[k], rank0[k]) for k in rank0)

    # Metrics averaged over the processes that report them, the same on both.
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}-mean.json").read_text()) == {"rank": 0.5, "only_rank1": 5.0}

    stops = [(tmp_path / f"rank{rank}-signalled.txt").read_text() for rank in (0, 1)]
    assert stops[0].startswith("stopped by a signal to another process after step 2"), stops[0]
    assert stops[1].startswith("stopped by SIGTERM after step 2"), stops[1]
    assert (tmp_path / "signalled" / "checkpoints" / "step-2").is_dir()

    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and {m["rank"] for m in metrics} == {0.0}
    # resuming from step 3 set the first line's step-6 aside; the resumed line wrote its own
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names[1:] == ["step-3", "step-6"] and names[0].startswith("abandoned-"), names
    rng = torch.load(run_dir / "checkpoints" / "step-3" / "rng.pt", weights_only=True)["per_process"]
    assert len(rng) == 2 and not torch.equal(rng[0]["generators"]["data"], rng[1]["generators"]["data"])
    # Each rank's process_tensors: written by the main process, one file per rank, restored to that rank.
    for rank in (0, 1):
        stored = safetensors.torch.load_file(str(run_dir / "checkpoints" / "step-3" / f"process-{rank}.safetensors"))
        assert list(stored) == ["own"] and torch.equal(stored["own"], torch.full((rank + 1,), float(rank)))
        restored = safetensors.torch.load_file(str(tmp_path / f"rank{rank}-process-tensors.safetensors"))
        assert list(restored) == ["own"] and torch.equal(restored["own"], stored["own"])


def _two_process_worker(out: Path) -> None:
    """Rank-dependent data, 6 steps with a checkpoint at 3; then resume from step 3 and redo 4-6."""
    cfg = toy_config(out / "run")
    run = Run(cfg)
    rank = run.process_index
    problem = ToyProblem(cfg.train, data_seed=100 + rank, global_rng=False)
    problem.state.process_tensors["own"] = torch.full((rank + 1,), float(rank))  # shapes differ by rank
    if rank == 0:
        init = {f"param.{k}": v.detach().clone() for k, v in problem.params.items()}
        safetensors.torch.save_file(init, str(out / "init.safetensors"))
    problem.train(run, 0, 6, extra={"rank": rank})
    safetensors.torch.save_file(dict(problem.snapshot()), str(out / f"rank{rank}.safetensors"))
    local = {"rank": float(rank), **({"only_rank1": 5.0} if rank == 1 else {})}
    (out / f"rank{rank}-mean.json").write_text(json.dumps(run.mean_over_processes(local)))
    run.finish()

    run = Run(cfg.model_copy(update={"resume": str(out / "run" / "checkpoints" / "step-3")}))
    resumed = ToyProblem(cfg.train, data_seed=7, init_seed=3, global_rng=False)
    step = run.restore(resumed.state)
    safetensors.torch.save_file(resumed.state.process_tensors, str(out / f"rank{rank}-process-tensors.safetensors"))
    resumed.train(run, step, 6, extra={"rank": rank})
    safetensors.torch.save_file(dict(resumed.snapshot()), str(out / f"rank{rank}-resumed.safetensors"))
    run.finish()

    # A signal to rank 1 alone stops both ranks after the same step.
    run = Run(toy_config(out / "signalled"))
    problem = ToyProblem(run.cfg.train, data_seed=100 + rank, global_rng=False)
    problem.train(run, 0, 1)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        problem.train(run, 1, 6)
        stopped = "not stopped"
    except UserError as err:
        stopped = str(err)
    (out / f"rank{rank}-signalled.txt").write_text(stopped)

    if rank == 0:  # one process, both ranks' batches, mean loss: what the synced run must match
        reference = ToyProblem(cfg.train, global_rng=False)
        gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
        for _ in range(6):
            loss = (reference.loss(gens[0]) + reference.loss(gens[1])) / 2
            loss.backward()
            clip_gradients(reference.params, cfg.train.max_grad_norm)
            reference.optimizer.step()
            reference.scheduler.step()
            reference.optimizer.zero_grad(set_to_none=True)
            reference.state.extra_tensors["ema_loss"].mul_(0.9).add_(0.1 * loss.detach())
        safetensors.torch.save_file(dict(reference.snapshot()), str(out / "reference.safetensors"))


if __name__ == "__main__":
    _two_process_worker(Path(sys.argv[1]))
