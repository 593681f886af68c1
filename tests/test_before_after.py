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
