"""The bad-input corpus: every broken config, data file, run state or option a user can give
ends in ONE line, the last one printed, naming what is wrong, and a non-zero exit status.

Each row of ``CASES`` is (case, how to break the inputs, expected fragment of the last line).
Every case runs through the command line's entry point, ``diffalign.cli.main``, on the tiny SD
model (1-2 steps, no sample grids). Add a row for every new error path.

Below the corpus: what a failed command must never do (delete the user's work), the exit status
of a signal, and ``score --skip-bad``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffalign.cli import main

PAIRS = 4


def _write_pairs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(PAIRS):
        for name, shade in (("bright", 200 + i), ("dark", 40 + i)):
            Image.new("RGB", (16, 16), (shade, shade // 2, shade)).save(folder / f"{i}-{name}.png")
        lines.append(json.dumps({"prompt": f"a shape {i}", "chosen": f"{i}-bright.png", "rejected": f"{i}-dark.png"}))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _recipe(manifest: Path, out: Path, **sections) -> dict:
    recipe = {
        "method": "diffusion_dpo",
        "model": "tiny-sd",
        "output_dir": str(out),
        "lora": {"rank": 4, "alpha": 4},
        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 1, "warmup_steps": 0},
        "dpo": {"beta": 500.0},
        "data": {"source": str(manifest), "num_workers": 0},
        "logging": {"sample_every": 0},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def _save(recipe: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of the tiny SD (checkpoints step-1, step-2 and final/) and its data."""
    root = tmp_path_factory.mktemp("bad-inputs")
    manifest = _write_pairs(root / "data")
    run = root / "trained"
    assert main(["train", str(_save(_recipe(manifest, run), root / "recipe.yaml"))]) == 0
    return {"root": root, "manifest": manifest, "run": run}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1] if lines else ""


# --- the corpus: each setup returns the command line (after `diffalign`) ---------------------------


def _train(tmp, trained, overrides=(), recipe_changes=None, flags=()):
    recipe = _recipe(trained["manifest"], tmp / "run", **(recipe_changes or {}))
    return ["train", str(_save(recipe, tmp / "recipe.yaml")), *overrides, *flags]


def _resume_copy(tmp, trained, damage=None, overrides=(), recipe_changes=None):
    run = tmp / "run"
    shutil.copytree(trained["run"], run)
    if damage is not None:
        damage(run)
    return _train(tmp, trained, ["resume=latest", *overrides], recipe_changes)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _not_utf8_manifest(tmp, trained):
    data = tmp / "data"
    shutil.copytree(trained["manifest"].parent, data)
    manifest = data / "pairs.jsonl"
    lines = manifest.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"a shape 1", b"a shape \xff\xfe")
    manifest.write_bytes(b"\n".join(lines))
    return _train(tmp, trained, [f"data.source={manifest}"])


def _null_prompt(tmp, trained):
    manifest = tmp / "pairs.jsonl"
    rows = [json.loads(line) for line in trained["manifest"].read_text().splitlines()]
    rows[0]["prompt"] = None
    base = trained["manifest"].parent
    manifest.write_text("\n".join(json.dumps({**r, "chosen": str(base / r["chosen"]), "rejected": str(base / r["rejected"])})
                                  for r in rows) + "\n")
    return _train(tmp, trained, [f"data.source={manifest}"])


def _not_utf8_prompts(tmp, trained):
    prompts = tmp / "prompts.txt"
    prompts.write_bytes(b"a red circle\na blue \xe9square\n")
    recipe = {"method": "draft", "model": "tiny-sd", "output_dir": str(tmp / "run"),
              "train": {"max_steps": 1}, "draft": {"reward": "brightness", "prompts": str(prompts)}}
    return ["train", str(_save(recipe, tmp / "draft.yaml"))]


def _duplicate_key(tmp, trained):
    text = yaml.safe_dump(_recipe(trained["manifest"], tmp / "run"), sort_keys=False)
    assert text.splitlines()[1] == "model: tiny-sd"
    (tmp / "recipe.yaml").write_text(text + "model: tiny-sdxl\n")
    return ["train", str(tmp / "recipe.yaml")]


def _read_only_output(tmp, trained):
    parent = _read_only_folder(tmp / "locked")
    return _train(tmp, trained, [f"output_dir={parent / 'run'}"])


def _read_only_folder(folder: Path) -> Path:
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    _MOUNTS.append(folder)
    return folder


_MOUNTS: list[Path] = []


@pytest.fixture(autouse=True)
def _unmount():
    yield
    while _MOUNTS:
        subprocess.run(["umount", "-l", str(_MOUNTS.pop())], capture_output=True)


def _d3po_resumes_dpo(tmp, trained):
    run = tmp / "run"
    shutil.copytree(trained["run"], run)
    recipe = {"method": "d3po", "model": "tiny-sd", "output_dir": str(run), "resume": "latest",
              "lora": {"rank": 4, "alpha": 4}, "train": {"max_steps": 3}, "d3po": {"reward": "brightness"}}
    return ["train", str(_save(recipe, tmp / "d3po.yaml"))]


def _overwrite_current_folder(tmp, trained):
    os.chdir(tmp)
    (tmp / "mine.txt").write_text("the user's own file")
    return _train(tmp, trained, ["output_dir=."], flags=["--overwrite"])


def _overwrite_non_run(tmp, trained):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "holiday.png").write_bytes(b"not a run")
    return _train(tmp, trained, [f"output_dir={tmp / 'photos'}"], flags=["--overwrite"])


def _generate_lora_of_another_family(tmp, trained):
    return ["generate", "--model", "tiny-sdxl", "--lora", str(trained["run"] / "final"), "--prompt", "a cat",
            "--steps", "1", "--out", str(tmp / "cat.png")]


def _generate_lora_not_a_lora(tmp, trained):
    (tmp / "empty").mkdir()
    return ["generate", "--model", "tiny-sd", "--lora", str(tmp / "empty"), "--prompt", "a cat",
            "--steps", "1", "--out", str(tmp / "cat.png")]


def _full_disk_at_checkpoint(tmp, trained, monkeypatch):
    import errno

    import diffalign.checkpoint as checkpoint

    real = checkpoint.write_file

    def write_file(path, data):
        if Path(path).name == "optimizer.pt" and ".tmp-step-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_file", write_file)
    return _train(tmp, trained)


CASES = [
    ("seed -1", lambda t, tr: _train(t, tr, ["seed=-1"]), "config error: seed: input should be greater than or equal to 0"),
    ("resolution 7", lambda t, tr: _train(t, tr, ["train.resolution=7"]),
     "train.resolution=7: the sd model needs a multiple of 8 (its downsampling), e.g. 8"),
    ("empty sample prompts", lambda t, tr: _train(t, tr, ["logging.sample_prompts=[]"]),
     "logging.sample_prompts: list should have at least 1 item"),
    ("empty eval prompts", lambda t, tr: _train(t, tr, ["eval.prompts=[]"]), "eval.prompts: list should have at least 1 item"),
    ("empty target modules", lambda t, tr: _train(t, tr, ["lora.target_modules=[]"]),
     "lora.target_modules: value error, an empty list trains nothing"),
    ("misspelt data.source", lambda t, tr: _train(t, tr, recipe_changes={"data": {"sorce": "x.jsonl"}}),
     "config error: unknown key 'data.sorce'; did you mean 'data.source'?"),
    ("duplicate yaml key", _duplicate_key, "recipe.yaml: duplicate key 'model' at line 20 (first at line 2); keep one of them"),
    ("flow-only option on SD", lambda t, tr: _train(t, tr, ["dpo.timestep_sampling=logit_normal"]),
     "dpo.timestep_sampling=logit_normal acts on flow-matching models only"),
    ("unknown reward", lambda t, tr: _train(t, tr, ["eval.reward=brightnes"]),
     "eval.reward: unknown reward 'brightnes' (did you mean 'brightness'?)"),
    ("missing model folder", lambda t, tr: _train(t, tr, ["model=./no/such/model"]), "model: no such folder ./no/such/model"),
    ("missing manifest", lambda t, tr: _train(t, tr, ["data.source=missing.jsonl"]), "data.source: manifest missing.jsonl not found"),
    ("missing data folder", lambda t, tr: _train(t, tr, ["data.source=./pick-a-pic"]), "data.source: no such file or folder ./pick-a-pic"),
    ("non-UTF-8 manifest", _not_utf8_manifest, "pairs.jsonl line 2: not UTF-8 text (byte 0xff)"),
    ("null prompt", _null_prompt, "pairs.jsonl line 1: prompt=null; prompt, chosen and rejected must be text"),
    ("non-UTF-8 prompt file", _not_utf8_prompts, "prompts.txt line 2: not UTF-8 text (byte 0xe9)"),
    ("truncated checkpoint LoRA", lambda t, tr: _resume_copy(t, tr, lambda r: _truncate(r / "checkpoints/step-2/lora.safetensors")),
     "step-2/lora.safetensors is damaged or unreadable"),
    ("corrupt state.json", lambda t, tr: _resume_copy(t, tr, lambda r: (r / "checkpoints/step-2/state.json").write_text("{")),
     "step-2/state.json is damaged or unreadable"),
    ("resume with another LoRA rank", lambda t, tr: _resume_copy(t, tr, overrides=["lora.rank=8"]),
     "lora.rank was 4 in the run that wrote"),
    ("d3po resumes a dpo run", _d3po_resumes_dpo, "is a checkpoint of a diffusion_dpo run, and this config trains d3po"),
    ("read-only output folder", _read_only_output, "is not writable"),
    ("overwrite the current folder", _overwrite_current_folder, "output_dir . is the current folder; --overwrite never replaces it"),
    ("overwrite a folder that is not a run", _overwrite_non_run, "is not a diffalign run (no config.yaml)"),
    ("generate with another family's LoRA", _generate_lora_of_another_family,
     "the LoRA was trained on a sd model but --model is a sdxl model"),
    ("generate with a folder holding no LoRA", _generate_lora_not_a_lora, "no pytorch_lora_weights.safetensors in this folder"),
    ("full disk at a checkpoint", "monkeypatch", "disk full while writing"),
]


@pytest.mark.parametrize("case, setup, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(case, setup, fragment, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _full_disk_at_checkpoint(tmp_path, trained, monkeypatch) if setup == "monkeypatch" else setup(tmp_path, trained)
    code = main(argv)
    err = capsys.readouterr().err
    last = _last_line(err)
    assert code == 2, err[-2000:]
    assert last.startswith("error: ") and fragment in last, err[-2000:]
    assert "Traceback" not in err


def test_damaged_checkpoint_error_points_to_the_previous_one(trained, tmp_path, capsys):
    argv = _resume_copy(tmp_path, trained, lambda r: _truncate(r / "checkpoints/step-2/lora.safetensors"),
                        overrides=["train.learning_rate=1e-4"])
    before = _snapshot(tmp_path / "run")
    assert main(argv) == 2
    after = _snapshot(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "log.txt"} == {k: v for k, v in before.items() if k != "log.txt"}
    assert _last_line(capsys.readouterr().err).endswith(
        f"resume from the previous checkpoint instead: resume={tmp_path / 'run' / 'checkpoints' / 'step-1'}"
    )


def test_full_disk_names_the_file_and_the_intact_checkpoint(trained, tmp_path, capsys, monkeypatch):
    assert main(_full_disk_at_checkpoint(tmp_path, trained, monkeypatch)) == 2
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _last_line(capsys.readouterr().err) == (
        f"error: disk full while writing {checkpoints / 'step-2' / 'optimizer.pt'}; the previous checkpoint "
        f"{checkpoints / 'step-1'} is intact (free some space, then continue with resume=latest)"
    )
    assert [p.name for p in checkpoints.iterdir()] == ["step-1"]


def test_the_error_is_the_last_line_even_after_the_progress_bar(trained, tmp_path):
    """A real process, stdout and stderr together: the resolution is checked after the bar
    started, and the bar is closed before the error is printed."""
    recipe = _save(_recipe(trained["manifest"], tmp_path / "run"), tmp_path / "recipe.yaml")
    result = subprocess.run([sys.executable, "-m", "diffalign.cli", "train", str(recipe), "train.resolution=12"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 2
    assert "train:" in result.stdout  # the bar was shown
    assert _last_line(result.stdout) == (
        "error: train.resolution=12: the sd model needs a multiple of 8 (its downsampling), e.g. 8 or 16"
    )


# --- a failed command never deletes what the user had ------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("override", ["data.source=typo.jsonl", "train.resolution=7", "eval.reward=nope", "model=./nowhere"])
def test_a_failed_overwrite_leaves_the_old_run_as_it_was(trained, tmp_path, capsys, override):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = _snapshot(run)
    assert main(_train(tmp_path, trained, [override], flags=["--overwrite"])) == 2
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"]  # no staging folder left


def test_overwrite_of_the_current_folder_keeps_the_users_files(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _overwrite_current_folder(tmp_path, trained)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    assert _snapshot(tmp_path) == before


def test_dry_run_checks_the_files_too(trained, tmp_path, capsys):
    assert main(_train(tmp_path, trained, ["data.source=typo.jsonl"], flags=["--dry-run"])) == 2
    assert _last_line(capsys.readouterr().err) == "error: data.source: manifest typo.jsonl not found"


# --- signals ------------------------------------------------------------------------------------------


def test_a_signal_during_start_up_stops_at_once_with_one_line(trained, tmp_path, capsys, monkeypatch):
    """SIGINT while the model loads (sent from the loading call itself, so it lands there): exit
    130, one line, no traceback, no checkpoint."""
    import diffalign.training as training

    real = training.load_policy

    def load_policy_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "load_policy", load_policy_interrupted)
    handler = signal.getsignal(signal.SIGINT)
    assert main(_train(tmp_path, trained)) == 130
    err = capsys.readouterr().err
    assert _last_line(err) == "error: interrupted before training began; nothing was trained" and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) == handler
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctrl_c_while_torch_is_still_importing_is_one_line(trained, tmp_path):
    """A real SIGINT to `diffalign train` at the moment torch's import begins (an import hook sends
    it, so the timing never depends on the machine's load): exit 130, one line, no traceback."""
    recipe = _save(_recipe(trained["manifest"], tmp_path / "run"), tmp_path / "recipe.yaml")
    code = (
        "import os, runpy, signal, sys\n"
        # as in a terminal: an earlier test of this pytest process may have left SIGINT ignored,
        # and an ignored signal stays ignored in the processes it starts
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "class InterruptTorchImport:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, InterruptTorchImport())\n"
        "sys.argv = ['diffalign', 'train', sys.argv[1]]\n"
        "runpy.run_module('diffalign.cli', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert _last_line(out) == "error: interrupted before training began; nothing was trained"
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_signal_during_training_checkpoints_and_exits_75(trained, tmp_path, capsys, monkeypatch):
    import diffalign.training as training

    real = training.optimizer_step

    def optimizer_step_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "optimizer_step", optimizer_step_then_sigterm)
    assert main(_train(tmp_path, trained, ["train.max_steps=5", "train.checkpoint_every=0"])) == 75
    last = _last_line(capsys.readouterr().err)
    assert last == (f"error: stopped by SIGTERM after step 1; {tmp_path / 'run' / 'checkpoints' / 'step-1'} holds it: "
                    "continue with resume=latest")


def test_the_final_lora_checkpoints_and_exports_follow_the_umask(trained, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    kohya = tmp_path / "kohya.safetensors"
    assert main(["export-lora", str(trained["run"] / "final"), "--format", "kohya", "--out", str(kohya)]) == 0
    files = [trained["run"] / "final" / "pytorch_lora_weights.safetensors", kohya, *(trained["run"] / "checkpoints").rglob("*.*")]
    assert len(files) > 5
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# --- generate --lora with a checkpoint folder --------------------------------------------------------


def test_generate_accepts_a_checkpoint_folder_as_the_lora(trained, tmp_path, capsys):
    """The last checkpoint holds the weights final/ was written from: the same image."""
    common = ["generate", "--model", "tiny-sd", "--prompt", "a cat", "--steps", "2", "--seed", "3"]
    assert main([*common, "--lora", str(trained["run"] / "final"), "--out", str(tmp_path / "final.png")]) == 0
    assert main([*common, "--lora", str(trained["run"] / "checkpoints" / "step-2"), "--out", str(tmp_path / "ckpt.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    final, ckpt, base = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("final", "ckpt", "base"))
    assert final == ckpt and final != base


# --- score --skip-bad ---------------------------------------------------------------------------------


def test_score_skip_bad_warns_per_file_and_counts(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"not a png")
    argv = ["score", str(folder), "--reward", "brightness", "--out", str(tmp_path / "scores.csv")]
    assert main(argv) == 2
    assert "1.png" in _last_line(capsys.readouterr().err)
    assert main([*argv, "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning:") == 1 and "1.png" in err and "skipped" in err
    assert "skipped 1 unreadable image (--skip-bad)" in out
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(rows) == 3 and not any("1.png" in row for row in rows)
