"""``diffalign score``: score images (or image pairs) with any registered rewards.

    diffalign score images/ --prompts prompts.txt --reward pickscore --reward aesthetic --out scores.csv
    diffalign score pairs.jsonl --reward vlm:model=Qwen/Qwen2.5-VL-7B-Instruct --pairwise --out prefs.jsonl

Inputs: a folder or glob of images (prompts from ``--prompts`` one line per image in file-name order,
``--prompt`` for all, or a ``<name>.txt`` next to each image), or a CSV/JSONL manifest with an image
column and a prompt column (``--pairwise``: two image columns; the output is P(first preferred)).
Relative image paths in a manifest are relative to the manifest's folder. Rows are written and
flushed batch by batch, so an error part-way keeps everything scored before it; ``--resume`` skips
rows already in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from diffalign.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "jpg")
PAIR_COLUMNS = (("image_a", "image_b"), ("image_0", "image_1"), ("jpg_0", "jpg_1"))
PROMPT_COLUMNS = ("prompt", "caption", "text")


@dataclass
class Row:
    """One item to score: its images (1, or 2 for a pair), prompt, and where it came from (for errors)."""

    images: tuple[str, ...]
    prompt: str
    where: str
    readable: bool = True


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``diffalign score`` options to ``parser``."""
    parser.add_argument("source", help="image folder, glob ('out/*.png'), or a .csv/.jsonl manifest")
    parser.add_argument("--reward", action="append", required=True, metavar="SPEC",
                        help="reward to score with, 'name' or 'name:key=value,...'; repeat for several")
    parser.add_argument("--prompts", metavar="FILE", help="text file, one prompt per image in file-name order")
    parser.add_argument("--prompt", metavar="TEXT", help="one prompt for every image")
    parser.add_argument("--pairwise", action="store_true",
                        help="score pairs (a manifest with two image columns): writes P(first image preferred)")
    parser.add_argument("--image-column", metavar="NAME[,NAME]",
                        help="manifest image column (two, comma-separated, with --pairwise); default: detected")
    parser.add_argument("--prompt-column", metavar="NAME", help="manifest prompt column; default: detected")
    parser.add_argument("--out", metavar="FILE", help="write scores to a .csv or .jsonl file")
    parser.add_argument("--resume", action="store_true", help="append to --out, skipping rows already in it")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per reward call (default 16)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip missing or unreadable images (a warning each, a count at the end) instead of stopping")


def run_score(args: argparse.Namespace) -> int:
    """Run ``diffalign score``; returns the exit code. User mistakes raise :class:`UserError`."""
    # 1. check everything cheap before loading any model (the images first: no torch import yet)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    read_rows(args, needs_prompts=False)

    import torch
    from tqdm import tqdm

    from diffalign.rewards import load_reward, parse_reward_spec, spec_uses_prompts
    from diffalign.rewards.registry import format_reward_spec, get_reward_entry

    specs = [parse_reward_spec(spec) for spec in args.reward]
    columns = _reward_columns(specs, format_reward_spec)
    needs_prompts = any(spec_uses_prompts({name: options}) for name, options in specs)
    rows = read_rows(args, needs_prompts, skip_missing=getattr(args, "skip_bad", False))
    out_format = _output_format(args.out) if args.out else None
    done = _already_scored(args.out, out_format, args.pairwise) if args.resume and args.out else set()
    todo = [row for row in rows if row.images not in done]

    # 2. load rewards
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards = []
    for name, options in specs:
        accepted = get_reward_entry(name).options
        extra = {k: v for k, v in {"device": device, "batch_size": args.batch_size}.items()
                 if (accepted is None or k in accepted) and k not in options}
        rewards.append(load_reward({name: options}, **extra))

    # 3. score batch by batch, writing and flushing each batch
    values: dict[str, list[float]] = {column: [] for column in columns}
    writer = _open_writer(args.out, out_format, args.pairwise, columns, append=bool(done)) if args.out else None
    skip_bad = getattr(args, "skip_bad", False)
    skipped = len(rows) - len([r for r in rows if r.readable])
    todo = [row for row in todo if row.readable]
    try:
        with tqdm(total=len(todo), unit="pair" if args.pairwise else "img", file=sys.stderr, disable=None) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                scores = _score_batch(batch, rewards, columns, args.pairwise, warn=(lambda message: bar.write(message, file=sys.stderr)) if skip_bad else None)
                for row, row_scores in zip(batch, scores):
                    if row_scores is None:
                        skipped += 1
                        continue
                    for column in columns:
                        values[column].append(row_scores[column])
                    if writer is not None:
                        writer.write(row, row_scores)
                if writer is not None:
                    writer.flush()
                bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()

    # 4. summary
    print(summary_table(values, pairwise=args.pairwise))
    if skip_bad:
        print(f"skipped {skipped} unreadable image{'s' if skipped != 1 else ''} (--skip-bad)")
    if args.resume and done:
        print(f"(skipped {len(rows) - len(todo)} rows already in {args.out}; the summary covers this run only)")
    return 0


def read_rows(args: argparse.Namespace, needs_prompts: bool, skip_missing: bool = False) -> list[Row]:
    """Turn ``source`` plus prompt options into rows; every image file is checked to exist
    (``skip_missing``: a row with a missing image is kept, marked unreadable, with a warning)."""
    source = args.source
    suffix = Path(source).suffix.lower()
    if suffix in (".csv", ".jsonl"):
        if args.prompts or args.prompt:
            raise UserError(f"{source}: a manifest carries its own prompts; drop --prompts/--prompt")
        rows = _read_manifest(Path(source), args, needs_prompts)
    else:
        if args.pairwise:
            raise UserError(f"--pairwise needs a .csv or .jsonl manifest with two image columns, got '{source}'")
        rows = _read_images(source, args, needs_prompts)
    for row in rows:
        for image in row.images:
            if not os.path.isfile(image):
                if not skip_missing:
                    raise UserError(f"{row.where}: image file '{image}' does not exist")
                print(f"warning: {row.where}: image file '{image}' does not exist; skipped", file=sys.stderr)
                row.readable = False
    if not rows:
        raise UserError(f"{source}: no rows to score")
    return rows


def summary_table(values: dict[str, list[float]], pairwise: bool = False) -> str:
    """A fixed-width table with n, mean, std, min and max per reward."""
    header = ("reward", "n", "mean", "std", "min", "max")
    lines = []
    for column, numbers in values.items():
        n = len(numbers)
        mean = sum(numbers) / n if n else math.nan
        std = math.sqrt(sum((x - mean) ** 2 for x in numbers) / (n - 1)) if n > 1 else math.nan
        lines.append((column, str(n), *(f"{v:.4f}" for v in (mean, std, min(numbers, default=math.nan),
                                                              max(numbers, default=math.nan)))))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    title = "P(first image preferred)" if pairwise else "scores"
    return "\n".join([title, fmt(header), *(fmt(r) for r in lines)])


# ---------------------------------------------------------------------- inputs
def _read_images(source: str, args: argparse.Namespace, needs_prompts: bool) -> list[Row]:
    if os.path.isdir(source):
        paths = [p for p in sorted(Path(source).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    elif any(char in source for char in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(source)) if Path(p).suffix.lower() in IMAGE_EXTENSIONS]
    elif os.path.isfile(source):
        paths = [Path(source)]
    else:
        raise UserError(f"'{source}' is not a folder, glob, image, .csv or .jsonl file")
    if not paths:
        raise UserError(f"'{source}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if args.prompts and args.prompt:
        raise UserError("give --prompts FILE or --prompt TEXT, not both")
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise UserError(f"--prompts '{args.prompts}' does not exist")
        from diffalign.data import read_text_lines

        lines = read_text_lines(Path(args.prompts), "--prompts")
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(paths):
            raise UserError(f"--prompts '{args.prompts}' has {len(lines)} lines but '{source}' has {len(paths)} images; "
                            f"give one prompt per image, in file-name order")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                raise UserError(f"{args.prompts} line {number}: empty prompt (for image {paths[number - 1].name})")
        return [Row((str(p),), line.strip(), f"{p}") for p, line in zip(paths, lines)]
    rows = []
    for path in paths:
        sidecar = path.with_suffix(".txt")
        if args.prompt is not None:
            prompt = args.prompt
        elif sidecar.is_file():
            prompt = sidecar.read_text(encoding="utf-8").strip()
        elif needs_prompts:
            raise UserError(f"no prompt for image '{path}': pass --prompts FILE (one line per image, "
                            f"in file-name order), --prompt TEXT, or put {sidecar.name} next to it")
        else:
            prompt = ""
        rows.append(Row((str(path),), prompt, str(path)))
    return rows


def _read_manifest(path: Path, args: argparse.Namespace, needs_prompts: bool) -> list[Row]:
    if not path.is_file():
        raise UserError(f"manifest '{path}' does not exist")
    records = list(_read_records(path))
    if not records:
        return []
    keys = list(records[0][1])
    image_columns = _pick_image_columns(path, keys, args)
    prompt_column = args.prompt_column or next((c for c in PROMPT_COLUMNS if c in keys), None)
    if args.prompt_column and args.prompt_column not in keys:
        raise UserError(f"{path}: no column '{args.prompt_column}' (columns: {', '.join(keys)})")
    if prompt_column is None and needs_prompts:
        raise UserError(f"{path}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}; columns: {', '.join(keys)}); "
                        f"set --prompt-column")
    rows = []
    for where, record in records:
        images = []
        for column in image_columns:
            value = record.get(column)
            if value in (None, ""):
                raise UserError(f"{where}: missing image in column '{column}'")
            images.append(str(value) if os.path.isabs(str(value)) else str(path.parent / str(value)))
        prompt = record.get(prompt_column) if prompt_column else ""
        if prompt is None or (needs_prompts and not str(prompt).strip()):
            raise UserError(f"{where}: missing prompt in column '{prompt_column}'")
        rows.append(Row(tuple(images), str(prompt), where))
    return rows


def _read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location for errors, record dict) for each data row of a CSV or JSONL file."""
    from diffalign.data import read_text_lines

    read_text_lines(path, "manifest")  # bytes that are not UTF-8: a UserError naming the line
    with open(path, newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            for number, record in enumerate(csv.DictReader(handle), start=2):
                yield f"{path} line {number}", record
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path} line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            yield f"{path} line {number}", record


def _pick_image_columns(path: Path, keys: list[str], args: argparse.Namespace) -> tuple[str, ...]:
    wanted = 2 if args.pairwise else 1
    if args.image_column:
        columns = tuple(c.strip() for c in args.image_column.split(","))
        if len(columns) != wanted:
            raise UserError(f"--image-column needs {wanted} column name(s){' (a,b)' if wanted == 2 else ''}, got {args.image_column!r}")
        missing = [c for c in columns if c not in keys]
        if missing:
            raise UserError(f"{path}: no column '{missing[0]}' (columns: {', '.join(keys)})")
        return columns
    candidates = PAIR_COLUMNS if args.pairwise else tuple((c,) for c in IMAGE_COLUMNS)
    for columns in candidates:
        if all(c in keys for c in columns):
            return columns
    looked = ", ".join("/".join(c) for c in candidates)
    raise UserError(f"{path}: no {'pair of image columns' if args.pairwise else 'image column'} "
                    f"(looked for {looked}; columns: {', '.join(keys)}); set --image-column")


def _load_image(path: str, where: str):
    """[3, H, W] float in [0, 1]; a one-line UserError if the file cannot be decoded."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"{where}: cannot read image '{path}' ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


# ---------------------------------------------------------------------- scoring
def _score_batch(
    batch: list[Row], rewards: list, columns: list[str], pairwise: bool, warn=None
) -> list[dict[str, float] | None]:
    """Score one batch of rows with every reward. Images of different sizes go in separate calls.

    ``warn`` (``--skip-bad``): an unreadable image is reported through it and its row scored as
    None, instead of a UserError."""
    import torch

    loaded: list[list | None] = []
    for row in batch:
        try:
            loaded.append([_load_image(p, row.where) for p in row.images])
        except UserError as err:
            if warn is None:
                raise
            warn(f"warning: {err}; skipped")
            loaded.append(None)
    groups: dict[tuple, list[int]] = {}
    for index, images in enumerate(loaded):
        if images is not None:
            groups.setdefault(tuple(tuple(image.shape) for image in images), []).append(index)
    results: list[dict[str, float] | None] = [{} if images is not None else None for images in loaded]
    with torch.no_grad():
        for indices in groups.values():
            prompts = [batch[i].prompt for i in indices]
            first = torch.stack([loaded[i][0] for i in indices])
            for reward, column in zip(rewards, columns):
                if pairwise:
                    second = torch.stack([loaded[i][1] for i in indices])
                    scores = reward.compare(first, second, prompts)
                else:
                    scores = reward(first, prompts)
                for i, value in zip(indices, scores.tolist()):
                    results[i][column] = float(value)
    return results


def _reward_columns(specs: list[tuple[str, dict]], format_spec) -> list[str]:
    """Column name per reward: its name, or its full spec when two rewards share a name."""
    names = [name for name, _ in specs]
    columns = [name if names.count(name) == 1 else format_spec(name, options) for name, options in specs]
    if len(set(columns)) != len(columns):
        raise UserError(f"the same reward is given twice: {', '.join(c for c in columns if columns.count(c) > 1)}")
    return columns


# ---------------------------------------------------------------------- outputs
def _output_format(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(f"--out '{out}' must end in .csv or .jsonl")
    return suffix[1:]


def _image_keys(pairwise: bool) -> list[str]:
    return ["image_a", "image_b"] if pairwise else ["image"]


def _already_scored(out: str, out_format: str, pairwise: bool) -> set[tuple[str, ...]]:
    if not os.path.isfile(out):
        return set()
    keys = _image_keys(pairwise)
    done = set()
    with open(out, newline="", encoding="utf-8") as handle:
        records = csv.DictReader(handle) if out_format == "csv" else (json.loads(l) for l in handle if l.strip())
        for record in records:
            if not all(k in record for k in keys):
                raise UserError(f"--resume: '{out}' has no {'/'.join(keys)} columns; it is not a matching scores file")
            done.add(tuple(record[k] for k in keys))
    return done


class _Writer:
    """Writes one output row per scored row, CSV or JSONL, flushed after each batch."""

    def __init__(self, handle, out_format: str, fields: list[str], image_keys: list[str], write_header: bool) -> None:
        self.handle = handle
        self.out_format = out_format
        self.fields = fields
        self.image_keys = image_keys
        self.csv = csv.DictWriter(handle, fieldnames=fields) if out_format == "csv" else None
        if self.csv is not None and write_header:
            self.csv.writeheader()

    def write(self, row: Row, scores: dict[str, float]) -> None:
        record = {**dict(zip(self.image_keys, row.images)), "prompt": row.prompt, **scores}
        if self.csv is not None:
            self.csv.writerow(record)
        else:
            self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _open_writer(out: str, out_format: str, pairwise: bool, columns: list[str], append: bool) -> _Writer:
    keys = _image_keys(pairwise)
    fields = [*keys, "prompt", *columns]
    if append and out_format == "csv":
        with open(out, newline="", encoding="utf-8") as handle:
            existing = next(csv.reader(handle), [])
        if existing != fields:
            raise UserError(f"--resume: '{out}' has columns {existing}, this run writes {fields}; use the same --reward list")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    handle = open(out, "a" if append else "w", newline="", encoding="utf-8")
    return _Writer(handle, out_format, fields, keys, write_header=not append)
