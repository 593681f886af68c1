"""Training data: preference pairs and prompt sets.

Preference pairs come from
* a **Pick-a-Pic**-schema dataset (``caption, jpg_0, jpg_1, label_0``; ``label_0 = 1`` means
  jpg_0 wins, 0 means jpg_1 wins, 0.5 is a tie and is dropped): a hub dataset id or a local
  folder of parquet / arrow files (``datasets``);
* a **JSONL manifest**, one ``{"prompt": ..., "chosen": path, "rejected": path}`` per line, paths
  relative to the manifest;
* ``builtin:brightness``: a small preference set the project makes itself (smooth colour fields
  ranked by the ``brightness`` reward), written as a JSONL manifest so it takes the same path;
* ``builtin:shapes`` (``builtin:shapes-sdxl`` ..., each also with ``-correct``): pairs sampled from a shapes-world base model
  and ranked by ``shapes_geneval`` (``diffalign.world_data``), written as Pick-a-Pic parquet.

Both images of a pair get identical augmentation (one resize, one crop, one flip). Randomness is
derived from (seed, epoch, index), so an epoch's order and crops are reproducible after resume.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffalign.errors import UserError

BUILTIN_PREFIX = "builtin:"


@dataclass
class PreferencePair:
    """One labelled pair: ``chosen`` was preferred over ``rejected`` for ``prompt``."""

    prompt: str
    chosen: Image.Image
    rejected: Image.Image
    row: str  # where it came from, for error messages ("pairs.jsonl line 3", "row 17")


@dataclass
class PairBatch:
    """A collated batch of B pairs.

    chosen, rejected: [B, 3, R, R] in [-1, 1]; original_sizes / crops_top_left: per image (h, w)
    and (top, left) for SDXL micro-conditioning, first the chosen images then the rejected.
    encoded: chosen and rejected hold VAE posteriors [B, 2C, h, w] from a latent cache
    (:mod:`diffalign.latent_cache`) instead of pixels.
    """

    prompts: list[str]
    chosen: Tensor
    rejected: Tensor
    original_sizes: list[tuple[int, int]]
    crops_top_left: list[tuple[int, int]]
    encoded: bool = False


def _open_image(source: bytes | str | os.PathLike, where: str) -> Image.Image:
    """Decode an image fully (so a truncated file fails here), as RGB."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except FileNotFoundError as err:
        raise UserError(f"{where}: image file not found: {source}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        label = "image bytes" if isinstance(source, bytes) else f"image {source}"
        raise UserError(f"{where}: cannot read {label} ({err}); fix or remove this row") from err
    return image.convert("RGB")


def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a line that is not UTF-8 is a UserError naming the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{what} {path} line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8"
        ) from None


# --- sources ---------------------------------------------------------------------------------


class JsonlPairs:
    """Pairs from a JSONL manifest ``{"prompt", "chosen", "rejected"}`` (image paths)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"data.source: manifest {self.path} not found")
        self.rows: list[dict] = []
        for number, line in enumerate(read_text_lines(self.path, "manifest"), start=1):
            if not line.strip():
                continue
            where = f"{self.path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from err
            missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or k not in row]
            if missing:
                raise UserError(f"{where}: missing key(s) {', '.join(missing)}; each line needs prompt, chosen, rejected")
            wrong = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row[k], str)]
            if wrong:
                got = ", ".join(f"{k}={json.dumps(row[k])}" for k in wrong)
                raise UserError(f"{where}: {got}; prompt, chosen and rejected must be text (a prompt may be \"\")")
            row["_where"] = where
            self.rows.append(row)
        if not self.rows:
            raise UserError(f"data.source: manifest {self.path} has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PreferencePair:
        row = self.rows[index]
        base = self.path.parent
        chosen = _open_image(base / row["chosen"], row["_where"])
        rejected = _open_image(base / row["rejected"], row["_where"])
        return PreferencePair(str(row["prompt"]), chosen, rejected, row["_where"])


class PickAPicPairs:
    """Pairs in the Pick-a-Pic schema from a hub dataset id or a local parquet/arrow folder.

    Ties (label_0 = 0.5) are dropped when the dataset is opened, unless ``keep_ties`` (the
    Diffusion-NPO authors' code keeps them, ordered like label_0 = 0: jpg_1 as chosen).
    """

    COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")

    def __init__(self, source: str, split: str = "train", max_samples: int | None = None, keep_ties: bool = False) -> None:
        self.source = source
        dataset = self._open(source, split)
        missing = [c for c in self.COLUMNS if c not in dataset.column_names]
        if missing:
            raise UserError(
                f"data.source {source!r}: missing column(s) {', '.join(missing)}; the Pick-a-Pic schema needs "
                f"{', '.join(self.COLUMNS)} (label_0 = 1 when jpg_0 wins)"
            )
        labels = dataset["label_0"]
        keep = []
        for i, label in enumerate(labels):
            if label not in (0, 1, 0.5, 0.0, 1.0):
                raise UserError(f"data.source {source!r} row {i}: label_0 must be 0, 0.5 or 1, got {label!r}")
            if label != 0.5 or keep_ties:
                keep.append(i)
        if max_samples is not None:
            keep = keep[:max_samples]
        if not keep:
            raise UserError(f"data.source {source!r}: no non-tied pairs in split {split!r}")
        self.dataset = dataset
        self.indices = keep

    @staticmethod
    def _open(source: str, split: str):
        import datasets

        from diffalign.console import quiet_libraries

        quiet_libraries()
        path = Path(source)
        try:
            if path.is_dir():
                if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                    loaded = datasets.load_from_disk(str(path))
                    return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
                files = sorted(path.rglob("*.parquet"))
                if files:
                    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
                files = sorted(path.rglob("*.arrow"))
                if files:
                    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
                raise UserError(f"data.source {source!r}: folder has no parquet or arrow files")
            return datasets.load_dataset(source, split=split)
        except UserError:
            raise
        except Exception as err:  # datasets raises many types for a missing hub id or bad files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"data.source {source!r}: cannot open it as a local dataset folder or hub dataset ({reason}); "
                "download it and set data.source=/path/to/folder"
            ) from err

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> PreferencePair:
        i = self.indices[index]
        row = self.dataset[i]
        where = f"data.source {self.source!r} row {i}"
        if not isinstance(row["caption"], str):
            raise UserError(f"{where}: caption must be text, got {type(row['caption']).__name__}")
        images = []
        for column in ("jpg_0", "jpg_1"):
            value = row[column]
            if isinstance(value, Image.Image):
                images.append(value.convert("RGB"))
            elif isinstance(value, (bytes, bytearray)):
                images.append(_open_image(bytes(value), f"{where} column {column}"))
            else:
                raise UserError(f"{where}: column {column} must hold image bytes, got {type(value).__name__}")
        chosen, rejected = images if row["label_0"] == 1 else images[::-1]
        return PreferencePair(row["caption"], chosen, rejected, where)


def open_preference_pairs(
    source: str, split: str = "train", max_samples: int | None = None, cache_dir: str | None = None,
    keep_ties: bool = False,
):
    """Open ``data.source``: ``builtin:NAME``, a ``.jsonl`` manifest, a local dataset folder or a
    hub dataset id. ``keep_ties``: keep Pick-a-Pic's label_0 = 0.5 pairs (see PickAPicPairs)."""
    if source.startswith(BUILTIN_PREFIX):
        source = str(builtin_pairs(source[len(BUILTIN_PREFIX):], cache_dir))
    if source.endswith(".jsonl"):
        pairs = JsonlPairs(source)
        if max_samples is not None:
            pairs.rows = pairs.rows[:max_samples]
        return pairs
    return PickAPicPairs(source, split, max_samples, keep_ties)


class PairSubset:
    """The pairs of ``dataset`` at ``indices`` (a view; nothing is loaded)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.dataset[self.indices[index]]


def split_pairs(dataset, num_eval: int):
    """(training pairs, held-out pairs or None): the last ``num_eval`` pairs are held out."""
    if num_eval == 0:
        return dataset, None
    if num_eval >= len(dataset):
        raise UserError(f"data.eval_pairs {num_eval} leaves no training pairs (the dataset has {len(dataset)})")
    size = len(dataset) - num_eval
    return PairSubset(dataset, range(size)), PairSubset(dataset, range(size, len(dataset)))


# --- augmentation and batching --------------------------------------------------------------------


def _pair_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + index) % (2**63))


def prepare_pair(
    pair: PreferencePair,
    resolution: int,
    generator: torch.Generator,
    random_crop: bool = False,
    random_flip: bool = True,
) -> tuple[Tensor, Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Resize both images (shorter side -> resolution), crop a square and maybe flip, with the
    same crop and flip for both. Returns (chosen, rejected) [3, R, R] in [-1, 1], their original
    sizes (h, w) and crop top-lefts (top, left)."""
    import torchvision.transforms.functional as TF

    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    crop_u = float(torch.rand((), generator=generator)) if random_crop else None
    crop_v = float(torch.rand((), generator=generator)) if random_crop else None
    tensors, sizes, crops = [], [], []
    for image in (pair.chosen, pair.rejected):
        sizes.append((image.height, image.width))
        x = TF.resize(TF.pil_to_tensor(image), resolution, antialias=True)
        h, w = x.shape[-2:]
        if crop_u is None:
            top, left = (h - resolution) // 2, (w - resolution) // 2
        else:
            top, left = round(crop_u * (h - resolution)), round(crop_v * (w - resolution))
        x = x[:, top : top + resolution, left : left + resolution]
        if flip:
            x = x.flip(-1)
        crops.append((top, left))
        tensors.append(x.float() / 127.5 - 1.0)
    return tensors[0], tensors[1], sizes, crops


def collate_pairs(
    dataset,
    indices: Sequence[int],
    resolution: int,
    seed: int,
    epoch: int,
    random_crop: bool = False,
    random_flip: bool = True,
) -> PairBatch:
    """Load and augment the pairs at ``indices`` into a :class:`PairBatch`."""
    prompts, chosen, rejected = [], [], []
    sizes_c, sizes_r, crops_c, crops_r = [], [], [], []
    for index in indices:
        pair = dataset[index]
        c, r, sizes, crops = prepare_pair(
            pair, resolution, _pair_generator(seed, epoch, index), random_crop, random_flip
        )
        prompts.append(pair.prompt)
        chosen.append(c)
        rejected.append(r)
        sizes_c.append(sizes[0]); sizes_r.append(sizes[1])
        crops_c.append(crops[0]); crops_r.append(crops[1])
    return PairBatch(prompts, torch.stack(chosen), torch.stack(rejected), sizes_c + sizes_r, crops_c + crops_r)


class EpochSampler:
    """Deterministic, resumable order over a dataset, sharded across processes.

    Each epoch is a permutation from (seed, epoch); ``state`` (epoch, position) is all a
    checkpoint needs to continue exactly. Every process takes its own ``batch_size`` slice of
    each global batch of ``batch_size * num_processes`` items.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, num_processes: int = 1) -> None:
        if size < batch_size * num_processes:
            raise UserError(
                f"the dataset has {size} items, fewer than one global batch "
                f"(train.batch_size {batch_size} x {num_processes} processes); add data or lower train.batch_size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.state = {"epoch": 0, "position": 0}
        self._orders: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._orders:  # the current epoch's, and the next one's once peeked at
            self._orders = {e: o for e, o in self._orders.items() if e >= self.state["epoch"]}
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(self.size, generator=generator).tolist()
        return self._orders[epoch]

    def load_state(self, state: dict) -> None:
        self.state.update(state)

    def _after(self, state: dict) -> tuple[dict, int, list[int]]:
        """The state after the batch that follows ``state``, that batch's epoch and this process's indices."""
        epoch, position = state["epoch"], state["position"]
        global_batch = self.batch_size * self.num_processes
        if position + global_batch > self.size:  # a partial last global batch is skipped
            epoch, position = epoch + 1, 0
        start = position + self.rank * self.batch_size
        indices = self._permutation(epoch)[start : start + self.batch_size]
        return {"epoch": epoch, "position": position + global_batch}, epoch, indices

    def next_indices(self) -> tuple[int, list[int]]:
        """(epoch, indices) of this process's next batch."""
        after, epoch, indices = self._after(self.state)
        self.state.update(after)
        return epoch, indices

    def peek(self, count: int) -> list[tuple[int, list[int]]]:
        """The (epoch, indices) that the next ``count`` calls of :meth:`next_indices` will return."""
        state, batches = dict(self.state), []
        for _ in range(count):
            state, epoch, indices = self._after(state)
            batches.append((epoch, indices))
        return batches


class Prefetcher:
    """Runs ``load(key)`` in ``workers`` background threads for the keys announced ahead, so that
    loading the next batches (image decoding, resizing) overlaps the training step. ``load`` must
    be a pure function of ``key``: a result does not depend on which thread made it, or when.
    An error in a background load is raised by the :meth:`get` that needs it. ``workers=0``
    loads in :meth:`get`."""

    def __init__(self, load, workers: int) -> None:
        self._load = load
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "diffalign-data") if workers else None
        self._pending: dict = {}

    def get(self, key):
        future = self._pending.pop(key, None)
        return future.result() if future is not None else self._load(key)

    def schedule(self, keys) -> None:
        """Start loading ``keys`` (the coming ones, in order); forget loads no longer coming."""
        if self._pool is None:
            return
        keys = list(keys)
        for stale in set(self._pending) - set(keys):
            self._pending.pop(stale).cancel()
        for key in keys:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._load, key)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = {}

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- prompt sets ------------------------------------------------------------------------------


def load_prompts(source: str | Sequence[str], key: str = "prompts") -> list[str]:
    """A prompt set: a list given inline, or a text file with one prompt per line."""
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{key}: prompt file {path} not found; give a text file (one prompt per line) or a list")
        prompts = [line.strip() for line in read_text_lines(path, "prompt file") if line.strip()]
        where = f"prompt file {path}"
    else:
        prompts = [str(p) for p in source]
        where = "the prompt list"
    if not prompts:
        raise UserError(f"{key}: {where} is empty")
    return prompts


# --- the built-in preference set -------------------------------------------------------------------

BUILTIN_PROMPTS = [
    "a sunny beach", "a lighthouse at noon", "a field of flowers", "a snowy mountain",
    "a cat on a sofa", "a bowl of fruit", "a city street", "a forest path",
]


def builtin_pairs(name: str, cache_dir: str | os.PathLike | None = None, num_pairs: int = 128, size: int = 64) -> Path:
    """Write (once) the built-in preference set ``name`` and return its JSONL manifest.

    ``brightness``: each pair is one smooth random colour field at two brightness offsets; the
    version the ``brightness`` reward scores higher is ``chosen``. Only brightness differs
    within a pair, so the preference is learnable from a few dozen pairs and the reward moves.
    """
    if name == "shapes" or name.startswith("shapes-"):
        from diffalign.world_data import builtin_shapes_pairs  # the shapes world's pairs (Pick-a-Pic parquet)

        return builtin_shapes_pairs(name, cache_dir)
    if name != "brightness":
        raise UserError(f"data.source: unknown built-in set 'builtin:{name}'; available: builtin:brightness, builtin:shapes")
    from diffalign.pipelines.tiny import cache_root
    from diffalign.rewards import load_reward

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / f"builtin-{name}-v2"
    manifest = folder / "pairs.jsonl"
    if manifest.exists():
        return manifest
    tmp = root / f".builtin-{name}-{os.getpid()}.tmp"
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    reward = load_reward("brightness")
    generator = torch.Generator().manual_seed(1234)
    lines = []
    for i in range(num_pairs):
        field = torch.nn.functional.interpolate(
            torch.rand(1, 3, 4, 4, generator=generator), size=(size, size), mode="bicubic", align_corners=False
        )
        offsets = (torch.rand(2, 1, 1, 1, generator=generator) - 0.5) * 0.6
        images = (field * 0.5 + 0.25 + offsets).clamp(0, 1)
        prompt = BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]
        scores = reward(images, [prompt, prompt])
        order = [0, 1] if scores[0] >= scores[1] else [1, 0]
        names = []
        for j in order:
            file = f"images/{i:03d}-{j}.png"
            Image.fromarray((images[j].permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp / file)
            names.append(file)
        lines.append(json.dumps({"prompt": prompt, "chosen": names[0], "rejected": names[1]}))
    (tmp / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same set first
        if not manifest.exists():
            raise
    return manifest
