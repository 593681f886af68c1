"""The training report: a real tiny run's report.html rendered in headless Chromium, plots only for
what was logged, a report at each checkpoint, and ``diffalign report RUN_DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.report import build_report, group_series, metric_series, read_metrics


def _tiny_draft_run(out: Path) -> Path:
    """DRaFT on tiny-sd for 4 steps: brightness trained, saturation held out, grids every 2 steps."""
    from diffalign.config import get_method, load_config

    cfg = load_config({
        "method": "draft", "model": "tiny-sd", "output_dir": str(out), "seed": 0,
        "draft": {"reward": "brightness", "num_steps": 2, "prompts": ["a cat", "a dog"]},
        "train": {"max_steps": 4, "learning_rate": 1e-2, "checkpoint_every": 2},
        "lora": {"rank": 4},
        "eval": {"reward": "saturation", "num_steps": 2, "prompts": ["a cat", "a red house"]},
        "logging": {"sample_every": 2, "sample_steps": 2, "sample_prompts": ["a cat", "a dog", "a tree", "a car"]},
    })  # fmt: skip
    _, trainer_cls = get_method("draft")
    trainer_cls(cfg).train()
    return out


def test_report_of_a_real_run_renders_in_chromium(tmp_path, browser_page):
    run_dir = _tiny_draft_run(tmp_path / "run")
    report = run_dir / "report.html"
    assert report.is_file()
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained

    page = browser_page
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(report.as_uri())
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({cls: e.className, alt: e.alt, w: e.naturalWidth, done: e.complete}))"
    )
    plots = [i["alt"] for i in images if i["cls"] == "plot"]
    grids = [i["alt"] for i in images if i["cls"] == "grid"]
    # the draft run logs loss, reward, grad_norm, lr; the guard (on: eval.reward is set) held-out
    # reward, diversity and drift
    assert {"loss", "training reward", "held-out reward", "diversity", "KL / drift from the base", "gradient norm",
            "learning rate"} <= set(plots)
    assert page.locator("td.ok").count() == 5  # the guard's checks at steps 0-4, in its table
    assert grids == ["samples at step 2", "samples at step 4"]
    assert all(i["done"] and i["w"] > 0 for i in images), images
    assert page.console_errors == []
    assert "batch: 1 prompts per process x 1 processes" in page.inner_text("body")
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def _write_run(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("method: toy\ntrain:\n  learning_rate: 0.1\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')


def test_report_draws_only_what_was_logged_and_cli_rebuilds_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_run(run_dir, [
        {"step": 1, "time": 0.0, "loss": 0.7, "lr": 0.1, "grad_norm": None},
        {"step": 2, "time": 1.0, "loss": 0.5, "lr": 0.1, "grad_norm": None},
        {"step": 2, "time": 1.0, "guard/verdict": "hacking", "guard/reason": "held-out reward fell 0.2 from its best",
         "guard/heldout_reward": 0.3, "guard/best_heldout": 0.5, "guard/best_step": 0, "guard/action": "stop"},
    ])  # fmt: skip
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 2]  # the torn last line of a killed run is skipped
    # grad_norm is only null (NaN/inf): no plot for it; loss, lr, held-out reward from the guard
    assert [title for title, _, _ in group_series(metric_series(records))] == ["loss", "held-out reward", "learning rate"]

    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    text = (run_dir / "report.html").read_text()
    assert text.count("class='plot'") == 3
    assert "<td class='hacking'>hacking</td>" in text and "held-out reward fell 0.2 from its best" in text
    assert "No sample grids" in text and "learning_rate: 0.1" in text
    assert build_report(run_dir).count("class='plot'") == 3

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "holds no metrics.jsonl; pass a run's output_dir" in capsys.readouterr().err


def test_every_checkpoint_rewrites_the_report(tmp_path):
    from run_toys import ToyProblem, toy_config

    from diffalign.run import Run

    cfg = toy_config(tmp_path / "run", max_steps=4, checkpoint_every=2)
    run = Run(cfg)
    problem = ToyProblem(cfg.train)
    run.log(1, {"loss": 1.0})
    run.log(2, {"loss": 0.5})
    run.maybe_checkpoint(2, problem.state)
    report = tmp_path / "run" / "report.html"
    assert report.read_text().count("class='plot'") == 1
    run.log(3, {"loss": 0.4, "lr": 0.05})
    run.finish()  # finish draws it again, with what came after the checkpoint
    assert report.read_text().count("class='plot'") == 2

    off = Run(toy_config(tmp_path / "off").model_copy(update={"logging": cfg.logging.model_copy(update={"report": False})}))
    off.finish()
    assert not (tmp_path / "off" / "report.html").exists()


@pytest.mark.parametrize("bad", ["file", "missing"])
def test_write_report_needs_a_folder(tmp_path, bad):
    from diffalign.errors import UserError
    from diffalign.report import write_report

    target = tmp_path / "x"
    if bad == "file":
        target.write_text("")
    with pytest.raises(UserError, match="is not a run directory"):
        write_report(target)


def test_many_large_grids_are_spread_and_scaled_down(tmp_path):
    """30 grids of 1030 x 1030 px: the page shows 12 (steps 1, 30 and evenly spaced between), each
    at most 512 px a side."""
    import base64
    import io
    import re

    from PIL import Image

    run_dir = tmp_path / "run"
    _write_run(run_dir, [{"step": 1, "loss": 1.0}])
    (run_dir / "samples").mkdir()
    for step in range(1, 31):
        Image.new("RGB", (1030, 1030), (step * 8, 0, 0)).save(run_dir / "samples" / f"step-{step:06d}.png")
    text = build_report(run_dir)
    steps = [int(s) for s in re.findall(r"<figcaption>step (\d+)</figcaption>", text)]
    assert len(steps) == 12 and steps[0] == 1 and steps[-1] == 30 and steps == sorted(steps)
    sizes = [Image.open(io.BytesIO(base64.b64decode(data))).size
             for data in re.findall(r"class='grid' alt='[^']*' src='data:image/png;base64,([^']+)'", text)]
    assert sizes == [(512, 512)] * 12
