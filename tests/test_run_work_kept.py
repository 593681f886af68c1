"""Work is never lost: --overwrite keeps the old run until the new one checkpoints, metrics lines
stay whole, resuming an older step sets the later history aside, changed settings on resume are
applied or refused before anything is written, non-finite losses are never checkpointed, and
damaged files or a full disk stop with one line that names the file and the intact checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Literal

import pytest
import torch

import diffalign.checkpoint as checkpoint_module
from diffalign.config import BaseRunConfig
from diffalign.errors import UserError
from diffalign.checkpoint import list_checkpoints
from diffalign.run import Run
from run_toys import ToyProblem, ToyRunConfig, read_metrics, toy_config


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(tmp_path):
    """--overwrite writes the new run next to the old one (.run.overwrite) and swaps it in at its
    first checkpoint: a start that fails before it changes nothing (abort drops the staging folder)."""
    out = tmp_path / "run"
    cfg = toy_config(out, max_steps=3, checkpoint_every=3)
    run = Run(cfg)
    ToyProblem(cfg.train).train(run, 0, 3)
    run.finish()
    old = _files(out)

    run = Run(toy_config(out, max_steps=2, checkpoint_every=2), overwrite=True)
    assert run.out_dir == tmp_path / ".run.overwrite" and _files(out) == old
    run.abort()  # what the command line does after an error
    assert _files(out) == old and not (tmp_path / ".run.overwrite").exists()

    cfg = toy_config(out, max_steps=2, checkpoint_every=2)
    run = Run(cfg, overwrite=True)
    problem = ToyProblem(cfg.train, init_seed=1)
    problem.train(run, 0, 1)
    assert _files(out) == old  # step 1 logged, nothing checkpointed yet: the old run is whole
    problem.train(run, 1, 2)
    run.finish()
    assert run.out_dir == out and [p.name for p in run.checkpoints()] == ["step-2"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or trash left


@pytest.mark.parametrize("where", ["cwd", "home", "parent", "not_a_run"])
def test_overwrite_refuses_folders_that_are_not_runs(tmp_path, monkeypatch, where):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(project if where == "home" else tmp_path / "elsewhere"))
    monkeypatch.chdir(project / "sub" if where == "parent" else tmp_path if where in ("home", "not_a_run") else project)
    target = {"cwd": ".", "home": str(project), "parent": "..", "not_a_run": str(project)}[where]
    (project / "config.yaml").write_text("method: toy_run\n")  # even a folder holding a config.yaml
    if where == "not_a_run":
        (project / "config.yaml").unlink()
    before = _files(project)
    expected = {"cwd": "is the current folder", "home": "is your home folder",
                "parent": "is a folder above the current one", "not_a_run": "is not a diffalign run (no config.yaml)"}
    with pytest.raises(UserError, match=re.escape(expected[where])):
        Run(toy_config(Path(target)), overwrite=True)
    assert _files(project) == before


def test_metrics_lines_are_whole_and_a_torn_tail_is_dropped_on_resume(tmp_path, capsys):
    cfg = toy_config(tmp_path / "run")
    run = Run(cfg)
    ToyProblem(cfg.train).train(run, 0, 4)  # checkpoint at 3, logged 4
    run.finish()
    path = tmp_path / "run" / "metrics.jsonl"
    assert path.read_bytes().endswith(b"\n") and len(read_metrics(tmp_path / "run")) == 4
    with open(path, "ab") as f:
        f.write(b'{"step": 5, "loss": 0.1')  # killed mid-line
    run = Run(cfg.model_copy(update={"resume": "latest"}))
    assert run.restore(ToyProblem(cfg.train).state) == 3
    run.finish()
    assert "dropped its torn last line" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_resuming_an_older_step_sets_the_later_line_aside_and_latest_follows_the_new_one(tmp_path):
    """A 6-step run; resume from its step 3 with other data (a new line), stopped by SIGTERM after
    step 4: the first line's step-6 and final/ move to checkpoints/abandoned-*, resume=latest picks
    the new step-4, and finishing the new line gives it bitwise as if never interrupted."""
    def new_line(out: Path, resume: str) -> tuple[Run, ToyProblem]:
        run = Run(toy_config(out).model_copy(update={"resume": resume}))
        problem = ToyProblem(run.cfg.train, init_seed=9)
        assert run.restore(problem.state) == 3
        problem.state.generators["data"].manual_seed(1234)  # other data from step 4 on
        return run, problem

    first = tmp_path / "first"
    run = Run(toy_config(first))
    ToyProblem(run.cfg.train).train(run, 0, 6)
    run.finish()
    straight, line = new_line(tmp_path / "straight", str(first / "checkpoints" / "step-3")), None
    straight[1].train(straight[0], 3, 6)
    straight[0].finish()

    out = tmp_path / "run"
    run = Run(toy_config(out))
    ToyProblem(run.cfg.train).train(run, 0, 6)
    run.finish()
    (out / "final").mkdir()
    (out / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"the first line's LoRA")
    first_step6 = _files(out / "checkpoints" / "step-6")
    run, line = new_line(out, str(out / "checkpoints" / "step-3"))
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["final", "step-6"]
    assert _files(aside[0] / "step-6") == first_step6 and not (out / "final").exists()
    line.train(run, 3, 4)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(UserError, match="stopped by SIGTERM after step 5"):
        line.train(run, 4, 6)
    assert [p.name for p in run.checkpoints()] == ["step-3", "step-5"]

    run = Run(toy_config(out).model_copy(update={"resume": "latest"}))
    resumed = ToyProblem(run.cfg.train, init_seed=5)
    assert run.restore(resumed.state) == 5
    resumed.train(run, 5, 6)
    run.finish()
    a, b = straight[1].snapshot(), resumed.snapshot()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_learning_rate_on_resume_is_applied_and_recorded(tmp_path, capsys):
    """Resuming at step 3 with train.learning_rate 0.05 -> 0.01: the optimizer and the schedule
    take 0.01 (constant after the 3 warmup steps, so the lr is 0.01 exactly), the change is
    printed, config.yaml says 0.01 and config.until-step-3.yaml keeps what ran before."""
    out = tmp_path / "run"
    cfg = toy_config(out)
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    problem.train(run, 0, 4)
    run.finish()

    cfg = toy_config(out, learning_rate=0.01).model_copy(update={"resume": "latest"})
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    assert run.restore(problem.state) == 3
    assert [g["lr"] for g in problem.optimizer.param_groups] == [0.01]
    assert problem.scheduler.base_lrs == [0.01] and problem.scheduler.get_last_lr() == [0.01]
    assert "resume: train.learning_rate changed 0.05 -> 0.01; applied from step 4" in capsys.readouterr().out
    problem.train(run, 3, 6)
    run.finish()
    assert problem.scheduler.get_last_lr() == [0.01]
    assert "learning_rate: 0.01" in (out / "config.yaml").read_text()
    assert "learning_rate: 0.05" in (out / "config.until-step-3.yaml").read_text()
    info = json.loads((out / "checkpoints" / "step-6" / "state.json").read_text())
    assert info["config"]["train"]["learning_rate"] == 0.01


class OtherToyConfig(BaseRunConfig):
    method: Literal["other_toy"] = "other_toy"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora": {"rank": 4}}, "lora.rank was 16 in the run that wrote"),
        ({"seed": 3}, "seed was 0 in the run that wrote"),
        ({"model": "tiny-sd"}, "model was 'tiny-sdxl' in the run that wrote"),
        ("other_method", "is a checkpoint of a toy_run run, and this config trains other_toy"),
    ],
)
def test_keys_that_cannot_change_on_resume_are_an_error_before_anything_is_written(tmp_path, change, message):
    out = tmp_path / "run"
    cfg = toy_config(out, max_steps=3)
    run = Run(cfg)
    ToyProblem(cfg.train).train(run, 0, 3)
    run.finish()
    before = _files(out)
    data = cfg.model_dump() | {"resume": "latest"}
    if change == "other_method":
        new = OtherToyConfig.model_validate({k: v for k, v in data.items() if k != "method"})
    else:
        for key, value in change.items():
            data[key] = data[key] | value if isinstance(value, dict) else value
        new = ToyRunConfig.model_validate(data)
    with pytest.raises(UserError, match=re.escape(message)):
        Run(new)
    assert _files(out) == before  # config.yaml still says what ran


def test_nonfinite_loss_is_skipped_like_a_nonfinite_gradient_and_never_checkpointed(tmp_path):
    """A NaN loss goes through train.skip_nonfinite_updates (skipped: weights unchanged); past the
    limit the run stops naming the checkpoint to resume from: the last one if a finite loss
    followed it, else the one before it (the last one holds the weights that gave the NaN). A
    state with NaN weights is never saved."""
    from diffalign.training import optimizer_step

    cfg = toy_config(tmp_path / "run", max_steps=4, skip_nonfinite_updates=1, checkpoint_every=1)
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    params = list(problem.params.values())
    folders = tmp_path / "run" / "checkpoints"

    def update(loss: float) -> dict:
        problem.loss(problem.state.generators["data"]).backward()  # finite gradients whatever `loss` says
        return optimizer_step(run, params, problem.optimizer, problem.scheduler, cfg.train, loss=loss)

    update(1.0)
    run.checkpoint(1, problem.state)
    update(1.0)  # a finite loss from step-1's weights: step-1 is good to resume from
    run.checkpoint(2, problem.state)
    weights = {k: v.detach().clone() for k, v in problem.params.items()}
    assert update(float("nan")) == {"skipped_updates": 1.0}
    assert all(torch.equal(weights[k], v) for k, v in problem.params.items())
    with pytest.raises(UserError) as info:
        update(float("inf"))
    assert str(info.value).startswith(
        f"the loss is inf (the update was not applied; 1 skipped in a row before it); resume from {folders / 'step-1'} "
        f"(resume={folders / 'step-1'}), the last checkpoint after which the loss stayed finite "
        f"({folders / 'step-2'} holds the weights that gave this loss) with a lower train.learning_rate"
    )
    update(1.0)

    def nan_gradient() -> dict:
        problem.loss(problem.state.generators["data"]).mul(float("nan")).backward()
        return optimizer_step(run, params, problem.optimizer, problem.scheduler, cfg.train, loss=1.0)

    assert nan_gradient() == {"skipped_updates": 2.0}  # the loss was finite: step-2 is the one to resume from
    with pytest.raises(UserError, match=r"the gradient norm is nan .*resume from the last checkpoint, which is finite "
                       r"\(resume=.*step-2\)"):
        nan_gradient()
    with torch.no_grad():
        problem.params["weight"][0, 0] = float("nan")
    with pytest.raises(UserError, match=r"the weights became NaN/inf by step 3, so step 3 was not checkpointed; "
                       r"the last checkpoint with finite weights is .*step-2"):
        run.checkpoint(3, problem.state)
    run.finish()
    assert [p.name for p in run.checkpoints()] == ["step-1", "step-2"]


def test_damaged_checkpoint_files_name_the_file_and_the_checkpoint_before(tmp_path):
    out = tmp_path / "run"
    cfg = toy_config(out, max_steps=4, checkpoint_every=2)
    run = Run(cfg)
    ToyProblem(cfg.train).train(run, 0, 4)
    run.finish()
    step2, step4 = out / "checkpoints" / "step-2", out / "checkpoints" / "step-4"
    lora_file = step4 / "lora.safetensors"
    lora_file.write_bytes(lora_file.read_bytes()[:50])
    run = Run(cfg.model_copy(update={"resume": "latest"}))
    with pytest.raises(UserError, match=re.escape(f"checkpoint file {lora_file} is damaged or unreadable (")) as info:
        run.restore(ToyProblem(cfg.train).state)
    assert str(info.value).endswith(f"resume from the previous checkpoint instead: resume={step2}")
    run.abort()
    (step2 / "state.json").write_text('{"step": 2, "num_')
    with pytest.raises(UserError, match=re.escape(f"checkpoint file {step2 / 'state.json'} is damaged")) as info:
        Run(cfg.model_copy(update={"resume": str(step2)}))
    assert str(info.value).endswith("no earlier checkpoint exists; start without resume")


def test_a_full_disk_while_checkpointing_names_the_file_and_the_intact_checkpoint(tmp_path, monkeypatch):
    """ENOSPC at the write of optimizer.pt (injected at the one call all checkpoint files go
    through): one UserError; step 3 stays the latest, and resuming from it works."""
    import errno

    import diffalign.files as files

    cfg = toy_config(tmp_path / "run")
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    problem.train(run, 0, 3)
    real_write = files._write_all
    current = {}

    def full_disk(fd, data):
        if current.get("name") == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    real_write_file = files.write_file

    def tracking(path, data):
        current["name"] = Path(path).name
        real_write_file(path, data)

    monkeypatch.setattr(files, "_write_all", full_disk)
    monkeypatch.setattr(checkpoint_module, "write_file", tracking)
    with pytest.raises(UserError) as info:
        problem.train(run, 3, 6)
    step3 = tmp_path / "run" / "checkpoints" / "step-3"
    assert str(info.value).startswith(
        f"disk full while writing {tmp_path / 'run' / 'checkpoints' / 'step-6' / 'optimizer.pt'}; "
        f"the previous checkpoint {step3} is intact"
    )
    monkeypatch.undo()
    run.finish()
    assert [p.name for p in run.checkpoints()] == ["step-3"]
    run = Run(cfg.model_copy(update={"resume": "latest"}))
    assert run.restore(ToyProblem(cfg.train).state) == 3
    run.finish()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted at tmp_path/disk (root only; skipped where mounting is not allowed)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: a failed test may hold a file open


def test_a_really_full_disk_stops_with_one_line_and_the_run_resumes(small_disk):
    """Step 3 checkpointed, then the disk filled up to the last byte: the run stops with "disk
    full while writing ...; the previous checkpoint .../step-3 is intact"; once space is freed,
    resume=latest continues from step 3."""
    cfg = toy_config(small_disk / "run")
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    problem.train(run, 0, 3)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(UserError) as info:
        problem.train(run, 3, 6)
    message = str(info.value)
    assert message.startswith("disk full while writing ") and f"{small_disk / 'run' / 'checkpoints' / 'step-3'} is intact" in message
    run.abort()
    filler.unlink()
    assert [p.name for p in list_checkpoints(small_disk / "run" / "checkpoints")] == ["step-3"]
    run = Run(cfg.model_copy(update={"resume": "latest"}))
    assert run.restore(ToyProblem(cfg.train, init_seed=4).state) == 3
    run.finish()


def test_output_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        cfg = toy_config(tmp_path / "run", max_steps=1)
        run = Run(cfg)
        ToyProblem(cfg.train).train(run, 0, 1)
        run.finish()
    finally:
        os.umask(previous)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o644, path
