"""Every YAML recipe validates and documents itself; the CLI's commands and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.config import list_methods, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


def test_every_method_has_recipes():
    assert len(RECIPES) >= 10
    methods = {load_config(str(path)).method for path in RECIPES}
    assert methods <= set(list_methods())
    assert "diffusion_dpo" in methods


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_validates_and_opens_with_a_header(path):
    cfg = load_config(str(path))
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lower())
    text = "\n".join(header)
    assert header, f"{path} must open with a comment header"
    assert "launch" in text and "override" in text and "hardware" in text, f"{path}: header needs hardware, launch, override"
    if path.parent != CONFIGS:  # configs/<method>/<family>.yaml: the folder names the method family
        assert cfg.method.replace("_", "") in path.parent.name.replace("_", "") or path.parent.name in ("npo", "grpo", "pref_grpo")


def test_dry_run_prints_resolved_config_and_batch(capsys):
    assert main(["train", str(CONFIGS / "quickstart.yaml"), "--dry-run", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "method: diffusion_dpo" in out and "batch_size: 2" in out
    assert "2 pairs per process x 1 processes x 1 accumulation steps" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learnig_rate=1", "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'"),
        ("dpo.loss=hinge", "dpo.loss"),
        ("train.max_steps=abc", "train.max_steps"),
        ("nonsense", "key=value"),
    ],
)
def test_config_mistakes_are_one_line_errors_with_exit_2(capsys, override, message):
    assert main(["train", str(CONFIGS / "quickstart.yaml"), "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert str(tmp_path / "nope.yaml") in capsys.readouterr().err


def test_methods_and_explain(capsys):
    assert main(["methods"]) == 0
    assert "diffusion_dpo" in capsys.readouterr().out.split()
    assert main(["explain", "diffusion_dpo"]) == 0
    out = capsys.readouterr().out
    assert "dpo.beta: float = 5000.0" in out and "train.mixed_precision: no | fp16 | bf16" in out
    assert "logging.report_to: list of tensorboard | wandb = []" in out
    assert main(["explain", "difusion_dpo"]) == 2
    assert "did you mean 'diffusion_dpo'" in capsys.readouterr().err


@pytest.mark.parametrize("method, lines", [
    ("diffusion_dpo", ["init_lora: str | None = None", "reference: base | init = 'base'", "data.keep_ties: bool = False",
                       "dpo.empty_prompt_fraction: float = 0.0"]),
    ("d3po", ["init_lora: str | None = None", "Pareto dominance"]),
    ("adjoint_matching", ["adjoint_matching.loss_reduction: mean | sum = 'mean'",
                          "adjoint_matching.adjoint_guidance: bool = False",
                          "adjoint_matching.empty_prompt_fraction: float = 0.2"]),
    ("draft", ["init_lora: str | None = None", "reference: base | init = 'base'"]),
    ("self_npo", ["init_lora: str | None = None"]),
])
def test_explain_shows_the_reference_options(capsys, method, lines):
    """Every option added to match the reference code is declared and documented (issue 10)."""
    assert main(["explain", method]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, line


def test_export_tiny_and_generate(tmp_path, capsys):
    from PIL import Image

    assert main(["export-tiny", "sd", str(tmp_path / "tiny-sd")]) == 0
    assert (tmp_path / "tiny-sd" / "model_index.json").exists()
    assert main(["export-tiny", "sd", str(tmp_path / "tiny-sd")]) == 2
    assert "not empty" in capsys.readouterr().err
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", str(tmp_path / "tiny-sd"), "--prompt", "a red cat", "--steps", "2",
                 "--height", "64", "--width", "64", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["generate", "--model", "tiny-sd", "--lora", str(tmp_path / "missing"), "--prompt", "x",
                 "--out", str(out)]) == 2
    assert "--lora" in capsys.readouterr().err


def test_generate_a_prompt_file_into_a_folder_that_score_reads(tmp_path, capsys):
    """--prompts: prompt i gets seed --seed + i, so its images equal a single --prompt run with
    that seed; prompts.txt lists each image's prompt in file-name order, as `score` expects."""
    import csv

    import numpy as np
    from PIL import Image

    (tmp_path / "eval.txt").write_text("a red cat\n\na blue house\n")
    out = tmp_path / "samples"
    common = ["--model", "tiny-sd", "--steps", "2", "--height", "64", "--width", "64", "--seed", "5"]
    assert main(["generate", *common, "--prompts", str(tmp_path / "eval.txt"), "--num-images", "2",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "00000-0.png", "00000-1.png", "00001-0.png", "00001-1.png", "prompts.txt"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a red cat", "a red cat", "a blue house", "a blue house"]
    assert main(["generate", *common[:-1], "6", "--prompt", "a blue house", "--num-images", "2",
                 "--out", str(tmp_path / "house.png")]) == 0
    assert (np.asarray(Image.open(tmp_path / "house-1.png")) == np.asarray(Image.open(out / "00001-1.png"))).all()
    capsys.readouterr()
    assert main(["score", str(out), "--prompts", str(out / "prompts.txt"), "--reward", "brightness",
                 "--out", str(tmp_path / "scores.csv")]) == 0
    with open(tmp_path / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == ["a red cat", "a red cat", "a blue house", "a blue house"]
    # a file as --out, or a folder with images in it, is refused before any model loads
    for bad in (tmp_path / "x.png", out):
        assert main(["generate", *common, "--prompts", str(tmp_path / "eval.txt"), "--out", str(bad)]) == 2
        assert "give a new or empty folder" in capsys.readouterr().err


def test_generate_npo_on_flux_needs_true_cfg(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-flux", "--npo", str(tmp_path), "--prompt", "x", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--true-cfg-scale" in capsys.readouterr().err
