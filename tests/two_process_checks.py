"""What the two-process trainer tests share (tests/test_d3po.py, test_draft.py,
test_adjoint_matching.py). Each worker saves, per rank, the LoRA before the first step and after
the last (``rank{r}-init/final.safetensors``), and what the rank scored and wrote under the run
folder (``rank{r}.json``); :func:`check_two_process_run` then checks them in the test process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def record_writes_under(root: Path) -> list[str]:
    """Record from now on every file-system change this process makes under ``root`` (a file
    opened for writing, mkdir, rename, remove, rmtree), through Python's audit hooks; returns the
    list the records go to. Compiled writers (safetensors, torch.save) raise no audit event, but
    the folders they write into are made with ``os.mkdir``."""
    root = os.path.abspath(root)
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    two_paths = ("os.rename", "os.link", "os.symlink")
    one_path = ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")
    writes: list[str] = []

    def under_root(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        path = os.path.abspath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode is not None else bool(flags & writing_flags)
            paths = [path] if writing else []
        elif event in two_paths:
            paths = list(args[:2])
        elif event in one_path:
            paths = [args[0]]
        else:
            return
        writes.extend(f"{event} {os.fsdecode(path)}" for path in paths if under_root(path))

    sys.addaudithook(hook)
    return writes


def register_recorded_brightness() -> list[dict]:
    """Register the reward ``recorded_brightness``: brightness that also records, per call, the
    prompts and each image's brightness, so a test can tell which samples each process drew.
    Returns the list the records go to."""
    from diffalign.rewards import Reward, register_reward
    from diffalign.rewards.rules import brightness

    calls: list[dict] = []

    class RecordedBrightness(Reward):
        def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            scores = brightness(images)
            calls.append({"prompts": list(prompts), "brightness": scores.detach().tolist()})
            return scores

    register_reward("recorded_brightness", differentiable=True, uses_prompts=False)(
        lambda: RecordedBrightness("recorded_brightness", differentiable=True, batch_size=None, weightless=True)
    )
    return calls


def save_rank_outputs(out: Path, snapshots: list[dict[str, torch.Tensor]], writes: list[str], scored: list[dict]) -> None:
    """This rank's LoRA before the first step and after the last, its writes and its scored samples."""
    from safetensors.torch import save_file

    rank = int(os.environ["RANK"])
    for name, state in (("init", snapshots[0]), ("final", snapshots[-1])):
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}-{name}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"writes": list(writes), "scored": scored}))


def check_two_process_run(out: Path, steps: int, checkpoints: list[str]) -> tuple[dict, dict]:
    """What every two-process trainer test checks; returns both ranks' records.

    The LoRA is bit-identical on both ranks, before (same initialisation) and after training, and
    training changed it; rank 0 alone wrote the run folder (config, metrics once per step,
    checkpoints, final/ holding exactly the synced LoRA) and rank 1 wrote nothing there.
    """
    from safetensors.torch import load_file

    init0, init1, final0, final1 = (load_file(str(out / f"rank{r}-{name}.safetensors"))
                                    for name in ("init", "final") for r in (0, 1))
    assert final0.keys() == final1.keys() == init0.keys() == init1.keys() and final0
    assert all(torch.equal(init0[k], init1[k]) for k in init0)
    assert all(torch.equal(final0[k], final1[k]) for k in final0)
    assert all(init0[k].abs().max() == 0 for k in init0 if "lora_B" in k)  # B starts at zero ...
    assert any(final0[k].abs().max() > 0 for k in final0 if "lora_B" in k)  # ... and training moved it

    run = out / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # one writer, no duplicates
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    saved = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))  # diffusers names
    assert len(saved) == len(final0)
    assert all(any(torch.equal(t, f) for f in final0.values()) for t in saved.values())

    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["writes"] == []
    # the recorder does see rank 0's writes: files opened for writing, folders renamed into place
    for path in ("config.yaml", "metrics.jsonl"):  # config.yaml is written whole and renamed into place
        assert f"open {run / path}" in rank0["writes"] or f"os.rename {run / path}" in rank0["writes"], path
    for path in ["final"] + [f"checkpoints/{name}" for name in checkpoints]:
        assert f"os.rename {run / path}" in rank0["writes"], path
    return rank0, rank1


def train_recording_rank_outputs(out: Path, trainer_cls: type, make_config: Callable[[], Any]) -> None:
    """The body of a two-process worker: with the recording reward registered and writes under
    ``out/run`` recorded, train ``trainer_cls(make_config())``, keeping the LoRA whenever
    ``evaluate`` runs (on every process, before the first step and after the last); then
    :func:`save_rank_outputs`."""
    from diffalign import lora

    class Recording(trainer_cls):
        snapshots: list = []

        def evaluate(self, policy, reward):
            self.snapshots.append(lora.lora_state_dict(policy.denoiser))
            return super().evaluate(policy, reward)

    scored = register_recorded_brightness()
    writes = record_writes_under(out / "run")
    Recording(make_config()).train()
    save_rank_outputs(out, Recording.snapshots, writes, scored)


def check_ranks_scored_their_own_images(rank0: dict, rank1: dict, images_per_call: list[int]) -> None:
    """Each rank made one reward call per entry of ``images_per_call``, of that many images, and
    no image of rank 1 scored the same as rank 0's at the same place (own noise streams)."""
    for calls in (rank0["scored"], rank1["scored"]):
        assert [len(call["brightness"]) for call in calls] == images_per_call
    for call0, call1 in zip(rank0["scored"], rank1["scored"]):
        assert all(a != b for a, b in zip(call0["brightness"], call1["brightness"]))
