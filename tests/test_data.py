"""Preference data: JSONL and Pick-a-Pic loaders, shared augmentation, resumable order."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from diffalign.data import (
    EpochSampler,
    Prefetcher,
    JsonlPairs,
    PickAPicPairs,
    builtin_pairs,
    collate_pairs,
    load_prompts,
    open_preference_pairs,
)
from diffalign.errors import UserError


def _png(color, size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(tmp_path, rows):
    for name, color in (("white.png", (255, 255, 255)), ("black.png", (0, 0, 0))):
        (tmp_path / name).write_bytes(_png(color))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_pairs_load_in_order(tmp_path):
    path = _manifest(tmp_path, [{"prompt": "p", "chosen": "white.png", "rejected": "black.png"}])
    pair = JsonlPairs(path)[0]
    assert pair.prompt == "p" and pair.chosen.getpixel((0, 0)) == (255, 255, 255) and pair.rejected.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "white.png"}', "line 2: missing key\\(s\\) rejected"),
        ("{not json", "line 2: not valid JSON"),
    ],
)
def test_jsonl_bad_row_names_the_line(tmp_path, line, message):
    path = _manifest(tmp_path, [{"prompt": "p", "chosen": "white.png", "rejected": "black.png"}])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(UserError, match=message):
        JsonlPairs(path)


def test_missing_and_corrupt_images_name_row_and_file(tmp_path):
    path = _manifest(tmp_path, [
        {"prompt": "p", "chosen": "gone.png", "rejected": "black.png"},
        {"prompt": "p", "chosen": "bad.png", "rejected": "black.png"},
    ])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    pairs = JsonlPairs(path)
    with pytest.raises(UserError, match=r"pairs.jsonl line 1: image file not found: .*gone.png"):
        pairs[0]
    with pytest.raises(UserError, match=r"pairs.jsonl line 2: cannot read image .*bad.png"):
        pairs[1]


def _pickapic_parquet(folder, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    table = pa.table({k: [r[k] for r in rows] for k in ("caption", "jpg_0", "jpg_1", "label_0")})
    pq.write_table(table, folder / "train-00000.parquet")
    return folder


def test_pickapic_labels_and_ties(tmp_path):
    white, black = _png((255, 255, 255)), _png((0, 0, 0))
    folder = _pickapic_parquet(tmp_path / "pap", [
        {"caption": "a", "jpg_0": white, "jpg_1": black, "label_0": 1.0},   # jpg_0 wins
        {"caption": "tie", "jpg_0": white, "jpg_1": black, "label_0": 0.5},  # dropped
        {"caption": "b", "jpg_0": white, "jpg_1": black, "label_0": 0.0},   # jpg_1 wins
    ])
    pairs = open_preference_pairs(str(folder))
    assert isinstance(pairs, PickAPicPairs) and len(pairs) == 2
    first, second = pairs[0], pairs[1]
    assert first.prompt == "a" and first.chosen.getpixel((0, 0)) == (255, 255, 255)
    assert second.prompt == "b" and second.chosen.getpixel((0, 0)) == (0, 0, 0)


def test_pickapic_ties_kept_on_request_in_the_npo_authors_order(tmp_path):
    """keep_ties (Diffusion-NPO's own data loading, G-U-N/Diffusion-NPO DPO-DPO-NPO/train_sd15.py:
    only label_0 == 1 swaps the order) keeps the label_0 = 0.5 pair, with jpg_1 as chosen like
    label_0 = 0; negative training then prefers jpg_0 there."""
    white, black = _png((255, 255, 255)), _png((0, 0, 0))
    folder = _pickapic_parquet(tmp_path / "pap", [
        {"caption": "a", "jpg_0": white, "jpg_1": black, "label_0": 1.0},
        {"caption": "tie", "jpg_0": white, "jpg_1": black, "label_0": 0.5},
    ])
    assert len(open_preference_pairs(str(folder))) == 1
    pairs = open_preference_pairs(str(folder), keep_ties=True)
    assert len(pairs) == 2 and pairs[1].prompt == "tie"
    assert pairs[1].chosen.getpixel((0, 0)) == (0, 0, 0) and pairs[1].rejected.getpixel((0, 0)) == (255, 255, 255)


def test_pickapic_bad_rows_and_schema(tmp_path):
    folder = _pickapic_parquet(tmp_path / "bad", [
        {"caption": "a", "jpg_0": b"garbage", "jpg_1": _png((0, 0, 0)), "label_0": 1.0},
    ])
    with pytest.raises(UserError, match=r"row 0 column jpg_0: cannot read image bytes"):
        open_preference_pairs(str(folder))[0]
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "schema").mkdir()
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "schema" / "a.parquet")
    with pytest.raises(UserError, match="missing column\\(s\\) caption, jpg_0, jpg_1, label_0"):
        open_preference_pairs(str(tmp_path / "schema"))
    with pytest.raises(UserError, match="data.source: manifest .* not found"):
        open_preference_pairs(str(tmp_path / "none.jsonl"))


def test_both_images_get_the_same_crop_and_flip(tmp_path):
    # A left-right gradient makes any flip visible; both images share one layout.
    img = Image.linear_gradient("L").rotate(90).convert("RGB").resize((96, 64))
    for name in ("a.png", "b.png"):
        img.save(tmp_path / name)
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) for _ in range(8)))
    batch = collate_pairs(JsonlPairs(path), list(range(8)), 32, seed=0, epoch=0, random_crop=True, random_flip=True)
    assert batch.chosen.shape == (8, 3, 32, 32) and -1 <= batch.chosen.min() and batch.chosen.max() <= 1
    assert torch.equal(batch.chosen, batch.rejected)
    assert batch.original_sizes[0] == (64, 96) and batch.crops_top_left[0][0] == 0
    left_brighter = (batch.chosen[:, :, :, :4].mean((1, 2, 3)) > batch.chosen[:, :, :, -4:].mean((1, 2, 3)))
    assert 0 < left_brighter.sum() < 8  # some flipped, some not
    again = collate_pairs(JsonlPairs(path), list(range(8)), 32, seed=0, epoch=0, random_crop=True, random_flip=True)
    assert torch.equal(again.chosen, batch.chosen)


def test_epoch_sampler_is_resumable_and_sharded():
    a = EpochSampler(10, 3, seed=0)
    seen = [a.next_indices() for _ in range(5)]
    assert [e for e, _ in seen] == [0, 0, 0, 1, 1]  # 3 full batches per epoch, the remainder skipped
    assert len(set(sum((i for e, i in seen[:3]), []))) == 9
    b = EpochSampler(10, 3, seed=0)
    for _ in range(2):
        b.next_indices()
    c = EpochSampler(10, 3, seed=0)
    c.load_state(dict(b.state))
    assert [c.next_indices() for _ in range(3)] == seen[2:]
    r0, r1 = EpochSampler(10, 2, 0, rank=0, num_processes=2), EpochSampler(10, 2, 0, rank=1, num_processes=2)
    assert not set(r0.next_indices()[1]) & set(r1.next_indices()[1])
    with pytest.raises(UserError, match="fewer than one global batch"):
        EpochSampler(3, 2, 0, num_processes=2)


def test_epoch_sampler_peek_foretells_next_indices_across_epochs_without_moving():
    for rank in (0, 1):
        sampler = EpochSampler(10, 2, seed=3, rank=rank, num_processes=2)
        sampler.next_indices()
        state = dict(sampler.state)
        ahead = sampler.peek(4)  # 2 global batches of 4 per epoch of 10: crosses two epochs
        assert sampler.state == state
        assert [e for e, _ in ahead] == [0, 1, 1, 2]
        assert [sampler.next_indices() for _ in range(4)] == ahead


def test_prefetcher_loads_ahead_in_threads_and_raises_where_needed():
    import threading

    threads = {}

    def load(key):
        threads[key] = threading.current_thread().name
        if key == "bad":
            raise UserError("row 7: image b.png is not an image")
        return key * 2

    with Prefetcher(load, workers=2) as loader:
        loader.schedule([1, 2, "bad"])
        assert loader.get(1) == 2 and loader.get(2) == 4
        assert threads[1].startswith("diffalign-data") and threads[2].startswith("diffalign-data")
        loader.schedule(["bad"])
        with pytest.raises(UserError, match="row 7: image b.png"):
            loader.get("bad")
        assert loader.get(5) == 10 and threads[5] == threading.current_thread().name  # not scheduled: loaded now
    with Prefetcher(load, workers=0) as loader:  # no threads: schedule does nothing, get loads
        loader.schedule([9])
        assert 9 not in threads and loader.get(9) == 18


def test_builtin_brightness_set_ranks_by_the_reward(tmp_path):
    from diffalign.rewards import load_reward

    manifest = builtin_pairs("brightness", tmp_path)
    pairs = JsonlPairs(manifest)
    assert len(pairs) == 128
    reward = load_reward("brightness")
    import torchvision.transforms.functional as TF

    for i in (0, 17, 127):
        pair = pairs[i]
        scores = reward(torch.stack([TF.to_tensor(pair.chosen), TF.to_tensor(pair.rejected)]), [pair.prompt] * 2)
        assert scores[0] >= scores[1]
    assert builtin_pairs("brightness", tmp_path) == manifest  # cached
    with pytest.raises(UserError, match="unknown built-in set 'builtin:nope'"):
        builtin_pairs("nope", tmp_path)


def test_prompt_sets(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert load_prompts(["x"]) == ["x"]
    with pytest.raises(UserError, match="prompt file .*missing.txt not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="is empty"):
        load_prompts([])
