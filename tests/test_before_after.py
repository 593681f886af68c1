"""``eval.grid``: a run ends by writing before_after.png, the evaluation prompts sampled by the
base model (top row of each seed) and by the trained LoRA (bottom row), same prompts and seeds."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffalign.config import load_config
from diffalign.pipelines.loading import load_policy
from diffalign.trainers.draft import DraftTrainer
from diffalign.training import sample_images

PROMPTS = ["a cat", "a dog", "a red house"]
PAD = 2


def _tiles(grid: np.ndarray, rows: int, cols: int, size: int) -> np.ndarray:
    """The [rows, cols, size, size, 3] images of a torchvision make_grid with padding 2."""
    return np.stack([np.stack([grid[PAD + r * (size + PAD):PAD + r * (size + PAD) + size,
                                    PAD + c * (size + PAD):PAD + c * (size + PAD) + size] for c in range(cols)])
                     for r in range(rows)])


def test_eval_grid_shows_base_and_trained_samples_with_the_same_seeds(tmp_path):
    cfg = load_config({
        "method": "draft", "model": "tiny-sd", "output_dir": str(tmp_path / "run"), "seed": 0,
        "draft": {"reward": "brightness", "num_steps": 3, "prompts": PROMPTS},
        "train": {"max_steps": 3, "learning_rate": 3e-2, "batch_size": 2, "checkpoint_every": 0},
        "lora": {"rank": 4},
        "eval": {"reward": "brightness", "prompts": PROMPTS, "num_steps": 3, "num_images_per_prompt": 2, "grid": True},
        "logging": {"report_to": []},
    })
    final = DraftTrainer(cfg).train()
    path = final.parent / "before_after.png"
    grid = np.asarray(Image.open(path).convert("RGB"))
    size = load_policy("tiny-sd").default_resolution()
    tiles = _tiles(grid, rows=4, cols=len(PROMPTS), size=size)  # base, trained (seed 0); base, trained (seed 1)
    assert grid.shape == (PAD + 4 * (size + PAD), PAD + len(PROMPTS) * (size + PAD), 3)

    # the base rows are what the untouched model samples with the evaluation seeds
    base = load_policy("tiny-sd")
    for k in range(2):
        expected = sample_images(base, PROMPTS, seed=k, num_steps=3)
        pixels = (expected.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(tiles[2 * k].astype(int) - pixels.astype(int)).max() <= 1
        # the trained rows differ, and DRaFT on brightness made them brighter
        assert tiles[2 * k + 1].mean() > tiles[2 * k].mean() + 1
    caption = path.with_suffix(".txt").read_text().splitlines()
    assert caption[0] == "rows: base, trained (seed 0); columns: a cat | a dog | a red house"



def test_the_grid_reuses_the_evaluations_samples_and_resamples_rows_whose_weights_changed(tmp_path, monkeypatch):
    from diffalign import lora, training
    from diffalign.run import Run

    calls = []
    real = training.sample_images

    def counted(*args, **kwargs):
        calls.append(list(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "sample_images", counted)
    settings = {
        "method": "draft", "model": "tiny-sd", "output_dir": str(tmp_path / "run"), "seed": 0,
        "draft": {"reward": "brightness", "num_steps": 3, "prompts": PROMPTS},
        "train": {"max_steps": 2, "learning_rate": 3e-2, "batch_size": 2, "checkpoint_every": 0},
        "lora": {"rank": 4},
        "eval": {"reward": "brightness", "prompts": PROMPTS, "num_steps": 3, "num_images_per_prompt": 2, "grid": True},
        "guard": {"enabled": False},
        "logging": {"report_to": [], "report": False},
    }
    cfg = load_config(settings)
    final = DraftTrainer(cfg).train()
    # the evaluations before and after sampled each seed once; the grid sampled nothing more
    assert [c for c in calls if c == PROMPTS] == [PROMPTS] * 4
    reused = np.asarray(Image.open(final.parent / "before_after.png").convert("RGB"))

    # the same grid sampled from scratch: the trained LoRA on a fresh base, nothing kept for it
    policy = load_policy("tiny-sd")
    for param in lora.load_lora(policy.denoiser, final).values():
        param.requires_grad_(True)  # trainable, as in a run
    run = Run(load_config({**settings, "output_dir": str(tmp_path / "fresh")}))
    calls.clear()
    training.write_before_after(run, policy, cfg.eval)
    assert calls == [PROMPTS] * 4  # base and trained rows of both seeds
    fresh = np.asarray(Image.open(tmp_path / "fresh" / "before_after.png").convert("RGB"))
    assert np.array_equal(fresh, reused)

    # kept rows are reused only while they show the weights: after an evaluation of this policy the
    # grid samples only the base rows (its adapter was not zero); once the weights change (as the
    # guard's keep_best changes them) it samples the trained rows again, and they show the change
    training.evaluate_reward(policy, lambda images, prompts: images.mean(dim=(1, 2, 3)), cfg.eval)
    calls.clear()
    training.write_before_after(run, policy, cfg.eval)
    assert calls == [PROMPTS] * 2
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fresh" / "before_after.png").convert("RGB")), reused)
    with torch.no_grad():
        for param in lora.lora_parameters(policy.denoiser).values():
            param.mul_(0.5)
    calls.clear()
    training.write_before_after(run, policy, cfg.eval)
    assert len(calls) == 4
    halved = np.asarray(Image.open(tmp_path / "fresh" / "before_after.png").convert("RGB"))
    assert not np.array_equal(halved, reused)
