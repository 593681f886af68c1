"""What a user sees: a quickstart-style run prints diffalign's banner, its own progress bar and the
summary (metrics before -> after, final LoRA, report, the stock-diffusers load line), and none of
the libraries' bars or notes; `--verbose` brings those back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FOREIGN = ("Loading pipeline components", "Loading weights", "Writing model shards", "No LoRA keys associated", "it/s]")
# A quickstart-style recipe: Diffusion-DPO on the tiny SDXL with a built-in preference set, with
# held-out evaluation before and after (written here so the test does not depend on the shipped models).
RECIPE = """\
method: diffusion_dpo
model: tiny-sdxl
lora: {rank: 8, alpha: 16}
train: {max_steps: 2, learning_rate: 1.0e-3, batch_size: 4, checkpoint_every: 2}
dpo: {beta: 500.0}
data: {source: "builtin:brightness", eval_pairs: 8}
logging: {sample_every: 0}
"""


def diffalign(*args: str, cache: Path) -> str:
    """Run the real command line in a fresh process (a fresh tiny-model cache, so the model is
    built and saved there too); stdout and stderr together."""
    env = dict(os.environ, DIFFALIGN_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        env.pop(key, None)  # as on a user's machine
    done = subprocess.run([sys.executable, "-m", "diffalign.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_quickstart_run_shows_only_diffalign_output(tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(RECIPE)
    text = diffalign("train", str(recipe), f"output_dir={out}", cache=tmp_path / "cache")
    assert not [word for word in FOREIGN if word in text], text[-3000:]
    assert "batch: " in text and " LoRA parameters" in text  # the start-up banner
    assert "train: 100%" in text and "step/s" in text        # diffalign's own bar
    assert " -> after " in text and "before " in text         # metrics before -> after
    assert f"final LoRA: {out / 'final'}" in text
    assert f"report: {out / 'report.html'}" in text and (out / "report.html").is_file()
    assert f'pipe.load_lora_weights("{out / "final"}")' in text

    # every generate with a LoRA used to print diffusers' text-encoder note; --verbose shows the libraries again
    args = ("generate", "--model", "tiny-sdxl", "--lora", str(out / "final"), "--prompt", "a red cat", "--steps", "2")
    quiet = diffalign(*args, "--out", str(tmp_path / "a.png"), cache=tmp_path / "cache")
    assert not [word for word in FOREIGN if word in quiet], quiet
    verbose = diffalign(*args, "--out", str(tmp_path / "b.png"), "--verbose", cache=tmp_path / "cache")
    assert "Loading pipeline components" in verbose and "No LoRA keys associated" in verbose


def test_warn_once_prints_each_message_once(capsys):
    from diffalign.console import warn_once

    for _ in range(3):
        warn_once("set eval.reward to see the held-out reward")
    warn_once("another thing to fix")
    assert capsys.readouterr().err == "warning: set eval.reward to see the held-out reward\nwarning: another thing to fix\n"
