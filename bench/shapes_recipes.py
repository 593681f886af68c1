"""Run the shapes-world recipes and measure each on sampled images, base vs trained.

    python bench/shapes_recipes.py                       # every configs/*/shapes-*.yaml (+ the quickstart)
    python bench/shapes_recipes.py configs/grpo/shapes-sd.yaml train.max_steps=20

For each recipe: train it (output in runs/bench-shapes/<method>-<file>), then sample the held-out
alignment-evaluation prompts (ALIGN_EVAL_PROMPTS, 2 seeds each, 20 deterministic steps, CFG 1.5)
from the base model and from base + the trained LoRA with the same seeds, and print strict and
partial shapes_geneval and shapes_pref for both. A negative (NPO) LoRA is measured the way it is
used: in the unconditional branch of CFG (``diffalign.pipelines.npo.enable_npo``).

A recipe whose guard keeps its best check (``guard.keep_best``, on by default) has ``final/`` chosen
on ``eval.prompts``, which are these same prompts and seeds; the script then also measures the last
step's LoRA (``last/``), which no choice on the test prompts touched.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, lora: str | None, negative: bool, seeds=(0, 1)) -> dict[str, float]:
    from diffalign.pipelines.loading import load_policy
    from diffalign.rewards import load_reward
    from diffalign.rewards.shapes_world import ALIGN_EVAL_PROMPTS
    from diffalign.world import SHAPES_GUIDANCE, sample_world

    prompts = [p for p in ALIGN_EVAL_PROMPTS for _ in seeds]
    noise_seeds = [s for _ in ALIGN_EVAL_PROMPTS for s in seeds]
    policy = load_policy(model)
    if lora is not None:
        if negative:
            from diffalign.pipelines.npo import apply_npo_to_pipeline

            apply_npo_to_pipeline(policy.pipe, lora)
        else:
            policy.pipe.load_lora_weights(lora)
    images = sample_world(policy, prompts, noise_seeds, 20, SHAPES_GUIDANCE)
    out = {}
    for name in ("shapes_geneval", "shapes_geneval:partial=true", "shapes_pref"):
        out[name.replace(":partial=true", "_partial")] = round(float(load_reward(name)(images, prompts).mean()), 4)
    return out


def run_recipe(path: Path, overrides: list[str]) -> dict:
    from diffalign.cli import main
    from diffalign.config import load_config

    name = f"{path.parent.name}-{path.stem}" if path.parent.name != "configs" else path.stem
    out_dir = ROOT / "runs" / "bench-shapes" / name
    cfg = load_config(str(path), [f"output_dir={out_dir}", *overrides])
    negative = bool(getattr(getattr(cfg, "dpo", None), "negative", False) or getattr(cfg, "negative", False))
    start = time.time()
    main(["train", str(path), f"output_dir={out_dir}", *overrides, "--overwrite"])
    seconds = time.time() - start
    before = measure(cfg.model, None, negative)
    after = measure(cfg.model, str(out_dir / "final"), negative)
    result = {"recipe": str(path.relative_to(ROOT)), "train_seconds": round(seconds), "before": before, "after": after}
    # with guard.keep_best, final/ is the step whose check on eval.prompts (these prompts and seeds)
    # scored best: a choice made on the test set. last/ (written only then) holds the last step's LoRA.
    if (out_dir / "last").is_dir():
        result["after_last_step"] = measure(cfg.model, str(out_dir / "last"), negative)
    return result


def main() -> None:
    torch.set_num_threads(2)
    args = sys.argv[1:]
    paths = [Path(a).resolve() for a in args if a.endswith(".yaml")]
    overrides = [a for a in args if not a.endswith(".yaml")]
    paths = paths or sorted(ROOT.glob("configs/*/shapes-*.yaml"))
    results = []
    for path in paths:
        result = run_recipe(path, overrides)
        results.append(result)
        b, a = result["before"], result["after"]
        print(f"{result['recipe']}: {result['train_seconds']} s; shapes_geneval {b['shapes_geneval']:.3f} -> "
              f"{a['shapes_geneval']:.3f}, partial {b['shapes_geneval_partial']:.3f} -> {a['shapes_geneval_partial']:.3f}, "
              f"shapes_pref {b['shapes_pref']:.3f} -> {a['shapes_pref']:.3f}", flush=True)
        if "after_last_step" in result:
            c = result["after_last_step"]
            print(f"  final/ is the guard's best check on these prompts; the last step's LoRA: shapes_geneval "
                  f"{c['shapes_geneval']:.3f}, partial {c['shapes_geneval_partial']:.3f}, shapes_pref {c['shapes_pref']:.3f}",
                  flush=True)
    out = ROOT / "runs" / "bench-shapes" / "results.jsonl"
    with out.open("a") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
