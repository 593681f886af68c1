"""Preference pairs and before/after comparisons on the shapes world.

``builtin:shapes`` (and ``builtin:shapes-sdxl``, ``-flux``, ``-sd3``): Pick-a-Pic-schema pairs
sampled from a shipped base model and ranked by the gold ``shapes_geneval`` (partial credit, so
"two of three constraints" beats "one"): for each alignment-training prompt, ``group_size``
images from consecutive seeds, the best against the worst; equal scores are a tie and are
dropped. ``builtin:shapes-correct`` (``builtin:shapes-sdxl-correct``, ...): ``CORRECT_GROUPS``
rounds of groups of ``CORRECT_GROUP_SIZE``, and every image that meets all of its prompt's
constraints against its group's worst (the base model's own correct samples, as preferred
images). ``diffalign world pairs`` writes the same rows as parquet for other tools.

``diffalign world compare`` samples the alignment-evaluation prompts from the base model and from
base + LoRA with the same seeds, prints the mean ``shapes_geneval`` of both and writes the image
grid (top row base, bottom row trained).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from diffalign.errors import UserError
from diffalign.files import new_folder
from diffalign.world import SHAPES_GUIDANCE

PAIRS_VERSION = 2  # 2: the alignment-training prompts of the pair-level held-out split
CORRECT_SUFFIX = "-correct"
CORRECT_GROUPS, CORRECT_GROUP_SIZE = 8, 8
# sampled without CFG in 10 steps: a quarter of the CFG-1.5, 20-step cost, and as often correct
CORRECT_SAMPLING = {"num_steps": 10, "guidance_scale": 1.0}
CORRECT_SET = {"groups": CORRECT_GROUPS, "group_size": CORRECT_GROUP_SIZE, "correct": True, **CORRECT_SAMPLING}


def _png(image) -> bytes:
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_preference_rows(model: str = "shapes-sd", prompts: Sequence[str] | None = None, groups: int = 4,
                           group_size: int = 4, seed: int = 0, num_steps: int = 20,
                           guidance_scale: float = SHAPES_GUIDANCE, correct: bool = False) -> list[dict]:
    """Pick-a-Pic rows {caption, jpg_0, jpg_1 (PNG bytes), label_0 (1: jpg_0 wins)} sampled from
    ``model`` on ``prompts`` (default: the alignment-training prompts), ties dropped; ``correct``:
    see :func:`rank_groups`."""
    import torch

    from diffalign.pipelines.loading import load_policy
    from diffalign.rewards.shapes_world import ALIGN_TRAIN_PROMPTS
    from diffalign.world import sample_world

    prompts = list(prompts or ALIGN_TRAIN_PROMPTS)
    policy = load_policy(model)
    jobs = [(p, seed + (g * len(prompts) + i) * group_size) for g in range(groups) for i, p in enumerate(prompts)]
    all_prompts = [p for p, _ in jobs for _ in range(group_size)]
    all_seeds = [s + k for _, s in jobs for k in range(group_size)]
    images = sample_world(policy, all_prompts, all_seeds, num_steps, guidance_scale)
    rows = rank_groups(images, all_prompts, group_size, correct=correct)
    if not rows:
        what = "no sample met every constraint of its prompt" if correct else "every group of samples tied under shapes_geneval"
        raise UserError(f"{model}: {what}; no pairs to write (sample more groups, or drop --correct)")
    return rows


def rank_groups(images, prompts: Sequence[str], group_size: int, correct: bool = False) -> list[dict]:
    """Pick-a-Pic rows from consecutive groups of ``group_size`` images of one prompt each
    (images [N, 3, H, W] in [0, 1]), scored by ``shapes_geneval`` partial credit. Default: the
    group's best vs its worst. ``correct``: every image that meets all of its prompt's constraints
    (GenEval's strict 1) vs the group's worst, so a group gives 0..group_size-1 rows. A group whose
    best and worst score the same is a tie and gives no row. jpg_0 is the winner in even rows and
    the loser in odd ones, so label_0 is not constant."""
    from diffalign.rewards import load_reward

    scores = load_reward("shapes_geneval:partial=true")(images, list(prompts)).view(-1, group_size)
    rows = []
    for j in range(scores.shape[0]):
        best, worst = int(scores[j].argmax()), int(scores[j].argmin())
        if scores[j, best] == scores[j, worst]:
            continue
        winners = [k for k in range(group_size) if scores[j, k] == 1.0] if correct else [best]
        prompt, loser = prompts[j * group_size], _png(images[j * group_size + worst])
        for k in winners:
            winner = _png(images[j * group_size + k])
            if len(rows) % 2:
                rows.append({"caption": prompt, "jpg_0": loser, "jpg_1": winner, "label_0": 0.0})
            else:
                rows.append({"caption": prompt, "jpg_0": winner, "jpg_1": loser, "label_0": 1.0})
    return rows


def write_pairs_parquet(rows: list[dict], out_dir: str | os.PathLike) -> Path:
    """Write rows as ``out_dir/train.parquet`` (Pick-a-Pic schema); ``out_dir`` must be new or empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = new_folder(out_dir, "world pairs")
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
        "label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
    })
    pq.write_table(table, out / "train.parquet")
    return out / "train.parquet"


def builtin_shapes_pairs(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of ``builtin:NAME`` (``shapes`` = from shapes-sd, ``shapes-FAMILY``, either with
    ``-correct``), built once."""
    from diffalign.pipelines.loading import SHAPES_MODELS, shapes_model_dir
    from diffalign.pipelines.tiny import cache_root

    correct = name.endswith(CORRECT_SUFFIX)
    base = name[:-len(CORRECT_SUFFIX)] if correct else name
    model = "shapes-sd" if base == "shapes" else base
    if model not in SHAPES_MODELS:
        names = ["shapes", *SHAPES_MODELS[1:]]
        raise UserError(f"data.source: unknown built-in set 'builtin:{name}'; available: builtin:brightness, "
                        f"{', '.join('builtin:' + m for m in names)}, and each shapes one with {CORRECT_SUFFIX}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    # keyed by the shipped weights' hash too: pairs sampled from an older build are never reused
    weights = json.loads((shapes_model_dir(model) / "manifest.json").read_text())["content_sha256"][:12]
    kind = CORRECT_SUFFIX if correct else ""
    folder = root / f"builtin-{model}{kind}-pairs-v{PAIRS_VERSION}-{weights}"
    if (folder / "train.parquet").exists():
        return folder
    tmp = root / f".builtin-{model}{kind}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_pairs_parquet(shapes_preference_rows(model, **(CORRECT_SET if correct else {})), tmp)
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same set first
        if not (folder / "train.parquet").exists():
            raise
    return folder


def compare_before_after(model: str, lora: str | None, out_png: str | os.PathLike,
                         prompts: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1), num_steps: int = 20,
                         guidance_scale: float = SHAPES_GUIDANCE) -> tuple[float, float]:
    """Mean strict ``shapes_geneval`` of base and base + ``lora`` samples (same prompts and seeds),
    and a grid PNG: one column per (prompt, seed), top row base, bottom row trained."""
    import torch
    from PIL import Image

    from diffalign.pipelines.loading import load_policy
    from diffalign.rewards import load_reward
    from diffalign.rewards.shapes_world import ALIGN_EVAL_PROMPTS
    from diffalign.world import sample_world

    prompts = list(prompts or ALIGN_EVAL_PROMPTS)
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    policy = load_policy(model)
    reward = load_reward("shapes_geneval")
    before = sample_world(policy, all_prompts, all_seeds, num_steps, guidance_scale)
    if lora is not None:
        if not Path(lora, "pytorch_lora_weights.safetensors").is_file():
            raise UserError(f"--lora {lora}: no pytorch_lora_weights.safetensors there; pass a run's final/ folder")
        policy.pipe.load_lora_weights(lora)
    after = sample_world(policy, all_prompts, all_seeds, num_steps, guidance_scale)
    score_before = float(reward(before, all_prompts).mean())
    score_after = float(reward(after, all_prompts).mean())
    grid = torch.cat([torch.cat(list(before), dim=2), torch.cat(list(after), dim=2)], dim=1)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(out)
    return score_before, score_after


def add_world_commands(world_commands) -> None:
    """``diffalign world pairs`` and ``diffalign world compare``."""
    pairs = world_commands.add_parser("pairs", help="write builtin:shapes preference pairs as Pick-a-Pic parquet")
    pairs.add_argument("--model", default="shapes-sd", help="a shapes model (shapes-sd, shapes-sdxl, ...)")
    pairs.add_argument("--out", required=True, help="a new or empty folder; train.parquet is written inside")
    pairs.add_argument("--groups", type=int, help="sampling rounds over the alignment-training prompts "
                       f"(default 4; with --correct {CORRECT_GROUPS})")
    pairs.add_argument("--group-size", type=int, help=f"images per prompt in each round (default 4; with --correct "
                       f"{CORRECT_GROUP_SIZE})")
    pairs.add_argument("--correct", action="store_true",
                       help="every image that meets all its prompt's constraints vs its group's worst, sampled as "
                            "builtin:shapes-correct is (default: each group's best vs its worst)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.set_defaults(func=_cmd_pairs)
    compare = world_commands.add_parser("compare", help="held-out shapes_geneval of base vs base + LoRA, and the grid")
    compare.add_argument("--model", default="shapes-sd")
    compare.add_argument("--lora", help="a run's final/ folder (omit: base only, twice)")
    compare.add_argument("--out", required=True, help="PNG path of the before/after grid")
    compare.add_argument("--steps", type=int, default=20)
    compare.add_argument("--guidance-scale", type=float, default=SHAPES_GUIDANCE)
    compare.set_defaults(func=_cmd_compare)


def _cmd_pairs(args) -> int:
    sizes = dict(CORRECT_SET) if args.correct else {"groups": 4, "group_size": 4}
    sizes.update({k: v for k, v in (("groups", args.groups), ("group_size", args.group_size)) if v is not None})
    for flag, key, least in (("--groups", "groups", 1), ("--group-size", "group_size", 2)):
        if sizes[key] < least:
            raise UserError(f"world pairs: {flag} {sizes[key]} is too small; use at least {least}")
    new_folder(args.out, "world pairs")  # before minutes of sampling, not after
    rows = shapes_preference_rows(args.model, seed=args.seed, **sizes)
    path = write_pairs_parquet(rows, args.out)
    print(f"wrote {len(rows)} pairs (ties dropped) to {path}")
    return 0


def _cmd_compare(args) -> int:
    before, after = compare_before_after(args.model, args.lora, args.out, num_steps=args.steps,
                                         guidance_scale=args.guidance_scale)
    print(f"held-out shapes_geneval (strict, {args.model}): before {before:.3f} -> after {after:.3f}; grid: {args.out}")
    return 0
