"""Train the ``shapes_pref`` learned reward against the gold ``shapes_geneval`` (partial) score.

    python -m diffalign.world_pref --out rewards/shapes_pref/shapes_pref.safetensors

Training examples are (image, caption, gold) triples, gold = ``shapes_geneval`` partial credit:
world images with their own caption and with a random other caption, world images with one
object recoloured or removed, and samples of the shipped base models (``--models``) for random
captions. Held out: world examples and model samples from other seeds, on which the Spearman
correlation with the gold score is measured and written to ``manifest.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _gold(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    from diffalign.rewards import load_reward

    return load_reward("shapes_geneval:partial=true")(images, list(prompts))


def world_examples(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` world images (some with an object recoloured or removed) and captions (their own or
    another one): images [n, 3, 64, 64] in [0, 1]."""
    from diffalign.rewards.shapes_world import COLORS, PALETTE, all_specs, parse_caption, render, scene_for

    rng = np.random.default_rng(seed)
    captions = [s.prompt for s in all_specs()]
    images, prompts = [], []
    for i in range(n):
        caption = captions[int(rng.integers(len(captions)))]
        scene = scene_for(parse_caption(caption), rng)
        kind = int(rng.integers(4))
        if kind == 1 and len(scene) > 1:  # drop an object
            scene = [o for j, o in enumerate(scene) if j != int(rng.integers(len(scene)))]
        image = render(scene)
        if kind == 2:  # recolour one object
            obj = scene[int(rng.integers(len(scene)))]
            new = COLORS[int(rng.integers(len(COLORS)))]
            x0, y0, x1, y1 = (4 * v for v in obj.box)
            patch = image[y0:y1, x0:x1]
            patch[(patch == PALETTE[obj.color]).all(-1)] = PALETTE[new]
        if kind == 3:  # someone else's caption
            caption = captions[int(rng.integers(len(captions)))]
        images.append(image)
        prompts.append(caption)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, prompts


def model_examples(model: str, n: int, seed: int, num_steps: int = 10) -> tuple[torch.Tensor, list[str]]:
    """``n`` samples of shipped model ``model`` for random grammar captions (noise seeds from ``seed``)."""
    from diffalign.pipelines.loading import load_policy
    from diffalign.rewards.shapes_world import all_specs
    from diffalign.world import sample_world

    rng = np.random.default_rng(seed)
    captions = [s.prompt for s in all_specs()]
    prompts = [captions[int(rng.integers(len(captions)))] for _ in range(n)]
    policy = load_policy(model)
    guidance = [float(g) for g in rng.choice([1.0, 2.0, 4.0], size=n)]
    images = []
    for g in sorted(set(guidance)):
        index = [i for i in range(n) if guidance[i] == g]
        out = sample_world(policy, [prompts[i] for i in index], [seed * 100_000 + i for i in index], num_steps, g)
        images.append((index, out))
    ordered = torch.empty(n, 3, 64, 64)
    for index, out in images:
        ordered[index] = out
    return ordered, prompts


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        values = x.double().numpy()
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for v in np.unique(values):  # average the ranks of ties
            r[values == v] = r[values == v].mean()
        return torch.from_numpy(r)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def train_shapes_pref(out: Path, models: Sequence[str], steps: int = 2000, seed: int = 0, world: int = 5000,
                      samples: int = 256, held_out: int = 192, log=print) -> dict:
    """Train, measure on held-out model samples, save weights + config + manifest into ``out``'s folder."""
    from safetensors.torch import save_file

    from diffalign.rewards.shapes_pref import ShapesPrefNet, tokenize

    torch.manual_seed(seed)
    start = time.time()
    images, prompts = world_examples(world, seed)
    parts = [(images, prompts)]
    for k, model in enumerate(models):
        parts.append(model_examples(model, samples, seed=seed + 1 + k))
    # Held out: new world examples (other seeds) and new model samples, half each.
    held = [world_examples(held_out // 2, seed + 100)]
    held += [model_examples(model, held_out // 2 // len(models), seed=seed + 100 + k) for k, model in enumerate(models)]
    train_images = torch.cat([p[0] for p in parts])
    train_prompts = [q for p in parts for q in p[1]]
    train_gold = _gold(train_images, train_prompts)
    held_images = torch.cat([h[0] for h in held])
    held_prompts = [q for h in held for q in h[1]]
    held_gold = _gold(held_images, held_prompts)
    log(f"shapes_pref: {len(train_prompts)} training examples, {len(held_prompts)} held-out samples, "
        f"data {time.time() - start:.0f}s")

    net = ShapesPrefNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    ids = tokenize(train_prompts)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, len(train_prompts), (128,), generator=generator)
        logits = net(train_images[index], ids[index])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, train_gold[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 500 == 0:
            log(f"shapes_pref step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        predicted = torch.sigmoid(net(held_images, tokenize(held_prompts)))
    rho = spearman(predicted, held_gold)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    (out.with_name("config.json")).write_text(json.dumps({"width": net.width, "text_width": 128}) + "\n")
    manifest = {
        "command": f"python -m diffalign.world_pref --out {out.name} --steps {steps} --seed {seed} "
                   f"--samples {samples} --models {' '.join(models)}",
        "held_out_spearman_vs_shapes_geneval_partial": round(rho, 4),
        "held_out_samples": len(held_prompts),
        "train_examples": len(train_prompts),
        "seconds": round(time.time() - start),
    }
    (out.with_name("manifest.json")).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"shapes_pref: held-out Spearman {rho:.3f}")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffalign.world_pref")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["shapes-sd"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=256, help="training samples drawn from each of --models")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_shapes_pref(args.out, args.models, args.steps, args.seed, samples=args.samples)


if __name__ == "__main__":
    main()
