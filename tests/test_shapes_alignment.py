"""Alignment on the shapes world: the learned reward, the builtin:shapes pairs, the recipes' prompt sets."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.config import load_config
from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.shapes_pref import SHIPPED_WEIGHTS
from diffalign.rewards.shapes_world import ALIGN_EVAL_PROMPTS, ALIGN_TRAIN_PROMPTS, HELD_OUT_PROMPTS, draw, parse_caption

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def to_tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_alignment_prompt_split_is_the_held_out_set():
    assert set(ALIGN_TRAIN_PROMPTS) | set(ALIGN_EVAL_PROMPTS) == set(HELD_OUT_PROMPTS)
    assert not set(ALIGN_TRAIN_PROMPTS) & set(ALIGN_EVAL_PROMPTS)
    assert len(ALIGN_TRAIN_PROMPTS) == len(ALIGN_EVAL_PROMPTS) == 12
    # a pair's two word orders are on one side, and every binding is on both sides
    pairs = {side: [frozenset((r.color, r.cls) for r in parse_caption(p).include) for p in prompts]
             for side, prompts in (("train", ALIGN_TRAIN_PROMPTS), ("eval", ALIGN_EVAL_PROMPTS))}
    assert not set(pairs["train"]) & set(pairs["eval"])
    assert {b for p in pairs["train"] for b in p} == {b for p in pairs["eval"] for b in p}
    assert len({b for p in pairs["train"] for b in p}) == 12


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/shapes-*.yaml")))
def test_shapes_recipes_train_and_measure_on_the_split(path):
    cfg = load_config(str(CONFIGS / path))
    assert cfg.model.startswith("shapes-")
    settings = next((getattr(cfg, k) for k in ("grpo", "d3po", "draft", "adjoint_matching") if hasattr(cfg, k)), None)
    if settings is not None:
        assert list(settings.prompts) == list(ALIGN_TRAIN_PROMPTS)
    if getattr(cfg, "eval", None) is not None and cfg.eval.reward is not None:
        assert list(cfg.eval.prompts) == list(ALIGN_EVAL_PROMPTS)
    if hasattr(cfg, "data") and hasattr(cfg.data, "random_flip"):
        assert cfg.data.random_flip is False  # a flip turns "left of" into "right of"


@pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shapes_pref weights are not shipped in this checkout")
def test_shapes_pref_agrees_with_the_gold_reward_and_has_gradients():
    manifest = json.loads(SHIPPED_WEIGHTS.with_name("manifest.json").read_text())
    # Measured 0.75 for the shipped weights (world images, edits and 2048 samples each of shapes-sd
    # and shapes-sdxl); the issue's target is 0.7.
    assert manifest["held_out_spearman_vs_shapes_geneval_partial"] >= 0.7
    reward = load_reward("shapes_pref")
    assert reward.differentiable
    prompts = list(ALIGN_EVAL_PROMPTS)
    own = to_tensor([draw(p, 0) for p in prompts])
    others = prompts[1:] + prompts[:1]  # each image under another caption
    assert reward(own, prompts).mean() > reward(own, others).mean() + 0.2
    images = own.clone().requires_grad_(True)
    reward(images, prompts).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_shapes_pref_missing_weights_is_one_line(tmp_path):
    with pytest.raises(UserError, match="reward 'shapes_pref': weights .* not found"):
        load_reward({"shapes_pref": {"weights": str(tmp_path / "none.safetensors")}})


def test_pairs_are_best_vs_worst_by_the_gold_reward_ties_dropped(tmp_path):
    from diffalign.data import open_preference_pairs
    from diffalign.world_data import rank_groups, write_pairs_parquet

    prompts = ["a blue circle and a red square", "a yellow triangle", "three squares"]
    blank = np.full((64, 64, 3), 232, dtype=np.uint8)
    groups = []
    for p in prompts[:2]:  # group: right image, blank, someone else's image, right image
        groups += [draw(p, 0), blank, draw("a green circle", 1), draw(p, 2)]
    groups += [blank] * 4  # "three squares": all blank -> a tie, dropped
    rows = rank_groups(to_tensor(groups), [p for p in prompts for _ in range(4)], 4)
    assert [r["caption"] for r in rows] == prompts[:2] and [r["label_0"] for r in rows] == [1.0, 0.0]
    path = write_pairs_parquet(rows, tmp_path / "pairs")
    pairs = open_preference_pairs(str(path.parent))
    assert len(pairs) == 2
    gold = load_reward("shapes_geneval:partial=true")
    for i in range(len(pairs)):
        pair = pairs[i]
        chosen, rejected = (to_tensor([np.asarray(im.convert("RGB"))]) for im in (pair.chosen, pair.rejected))
        assert gold(chosen, [pair.prompt]).item() == 1.0 and gold(rejected, [pair.prompt]) < 1.0
    with pytest.raises(UserError, match="exists and is not empty"):
        write_pairs_parquet(rows, tmp_path / "pairs")


def test_correct_pairs_prefer_every_correct_image_to_the_group_worst():
    """``correct=True`` (builtin:shapes-correct, the quickstart's pairs): each image meeting all
    its prompt's constraints is a winner against the group's worst; a group with none gives none."""
    from diffalign.world_data import rank_groups

    prompts = ["a blue circle and a red square", "a yellow triangle"]
    blank = np.full((64, 64, 3), 232, dtype=np.uint8)
    swapped = draw("a red circle and a blue square", 3)  # both objects there, colours swapped: partial 0.5
    groups = [draw(prompts[0], 0), swapped, blank, draw(prompts[0], 2)]
    groups += [draw("a yellow circle", 1), blank, draw("a green triangle", 4), blank]  # nothing correct
    images = to_tensor(groups)
    captions = [p for p in prompts for _ in range(4)]
    rows = rank_groups(images, captions, 4, correct=True)
    assert [r["caption"] for r in rows] == [prompts[0]] * 2 and [r["label_0"] for r in rows] == [1.0, 0.0]
    gold = load_reward("shapes_geneval")
    decode = lambda png: to_tensor([np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))])  # noqa: E731
    winners = [decode(r["jpg_0"] if r["label_0"] else r["jpg_1"]) for r in rows]
    losers = [decode(r["jpg_1"] if r["label_0"] else r["jpg_0"]) for r in rows]
    assert all(gold(w, [prompts[0]]).item() == 1.0 for w in winners)
    assert all(torch.equal(loser, images[2:3]) for loser in losers)  # the blank: worst
    # the default keeps one pair per group: best vs worst (the yellow-triangle group's best is partial 0.5)
    assert [r["caption"] for r in rank_groups(images, captions, 4)] == prompts


def test_builtin_shapes_is_a_data_source():
    from diffalign.errors import UserError as Error
    from diffalign.world_data import builtin_shapes_pairs

    with pytest.raises(Error, match="unknown built-in set 'builtin:shapes-xl'"):
        builtin_shapes_pairs("shapes-xl")
    with pytest.raises(Error, match="unknown built-in set 'builtin:shapes-xl-correct'.*with -correct"):
        builtin_shapes_pairs("shapes-xl-correct")


@pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shapes_pref weights are not shipped in this checkout")
def test_shapes_pref_can_be_over_optimised():
    """Gradient ascent on the pixels of a grey board drives shapes_pref to ~1 while the gold
    reward stays low: the learned reward can be hacked (what the reward-hacking guard watches).
    (From the world's near-white background two of the four stall: the scorer is sure such a
    board is empty, its sigmoid saturates near 0 and the gradient vanishes.)"""
    pref, gold = load_reward("shapes_pref"), load_reward("shapes_geneval:partial=true")
    prompts = ["a blue circle and a red square", "three triangles", "a yellow triangle", "a green circle left of a square"]
    logits = torch.zeros(4, 3, 64, 64, requires_grad=True)  # sigmoid(0) = mid grey
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(150):
        optimizer.zero_grad()
        (-pref(torch.sigmoid(logits), prompts).sum()).backward()
        optimizer.step()
    images = torch.sigmoid(logits).detach()
    assert pref(images, prompts).mean() > 0.99
    assert gold(images, prompts).mean() < 0.75  # measured 0.125


def test_builtin_shapes_pairs_are_cached_per_build_of_the_model(tmp_path):
    """The cached pairs are keyed by the shipped weights' content hash: a folder sampled from an
    earlier build of shapes-sd (the old key had no hash) is not what builtin:shapes reads."""
    import json

    from diffalign.pipelines.loading import shapes_model_dir
    from diffalign.world_data import PAIRS_VERSION, builtin_shapes_pairs

    weights = json.loads((shapes_model_dir("shapes-sd") / "manifest.json").read_text())["content_sha256"][:12]
    stale = tmp_path / f"builtin-shapes-sd-pairs-v{PAIRS_VERSION}"
    current = tmp_path / f"builtin-shapes-sd-pairs-v{PAIRS_VERSION}-{weights}"
    for folder in (stale, current):
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"placeholder")  # present: read without sampling
    assert builtin_shapes_pairs("shapes", cache_dir=tmp_path) == current


def test_world_pairs_refuses_a_used_out_folder_before_sampling(tmp_path, monkeypatch, capsys):
    """A non-empty --out (or a file) is a one-line error before any sampling; what is there is kept."""
    from diffalign import world_data
    from diffalign.cli import main

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(world_data, "shapes_preference_rows", no_sampling)
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep me")
    assert main(["world", "pairs", "--model", "shapes-sd", "--out", str(used)]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"world pairs: {used} exists and is not empty; choose a new folder (nothing was written)")
    assert sorted(p.name for p in used.iterdir()) == ["mine.txt"] and (used / "mine.txt").read_text() == "keep me"
    a_file = tmp_path / "pairs.parquet"
    a_file.write_bytes(b"x")
    assert main(["world", "pairs", "--model", "shapes-sd", "--out", str(a_file)]) != 0
    assert "is a file; --out takes a new or empty folder" in capsys.readouterr().err
    assert a_file.read_bytes() == b"x"
