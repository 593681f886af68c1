"""Diffusion-DPO data loading: how much of a step the pair images cost with ``data.num_workers``
threads loading the coming micro-batches, against loading them in the training loop.

It writes a JSONL manifest of random-content JPEG pairs (``--size``: tiny 64 px, small 512 px, full
1024 px, or ``--image-size``), then runs the DPO
trainer's loading path (``EpochSampler`` -> ``Prefetcher`` -> ``collate_pairs``: decode, crop,
flip, resize) for ``--steps`` micro-batches of ``--batch`` pairs while the main thread spends
``--compute-ms`` per step on matrix products (a stand-in for a denoiser step; on a GPU the main
thread mostly waits, so the overlap there is at least as good). It prints the time per step for
each worker count and its ratio to the compute alone (1.00x = loading fully hidden).

    python bench/data_loading.py --size full          # 1024 px, 4 pairs, 200 ms compute, workers 0/1/2
    python bench/data_loading.py --image-size 512 --batch 8 --compute-ms 500
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sizes import add_size_arguments


def write_pairs(folder: Path, count: int, size: int) -> Path:
    """``count`` pairs of smooth random JPEGs (photo-like file sizes) and their manifest."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        for side in ("a", "b"):
            small = Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))
            small.resize((size, size), Image.BICUBIC).save(folder / f"{i}{side}.jpg", quality=90)
        rows.append({"prompt": f"prompt {i}", "chosen": f"{i}a.jpg", "rejected": f"{i}b.jpg"})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return manifest


def busy(ms: float, operand: torch.Tensor) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        operand @ operand


def main() -> None:
    from diffalign.data import EpochSampler, Prefetcher, collate_pairs, open_preference_pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, help="stored image size and training resolution "
                        "(default: the --size's, 64 / 512 / 1024 px)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--compute-ms", type=float, default=200.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    size = args.image_size or {"tiny": 64, "small": 512, "full": 1024}[args.size]
    torch.set_num_threads(1)
    operand = torch.randn(512, 512)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = open_preference_pairs(str(write_pairs(Path(tmp), 4 * args.batch, size)))
        print(f"{args.batch} pairs of {size} px JPEGs per micro-batch (moved to {args.device}), {args.compute_ms:.0f} ms compute per step")
        for workers in args.workers:
            sampler = EpochSampler(len(pairs), args.batch, seed=0)

            def load(key):
                batch = collate_pairs(pairs, key[1], size, 0, key[0], True, True)
                batch.chosen, batch.rejected = batch.chosen.to(args.device), batch.rejected.to(args.device)
                return batch

            with Prefetcher(load, workers) as loader:
                start = time.perf_counter()
                for _ in range(args.steps):
                    epoch, indices = sampler.next_indices()
                    loader.get((epoch, tuple(indices)))
                    loader.schedule((e, tuple(i)) for e, i in sampler.peek(workers))
                    busy(args.compute_ms, operand)
                per_step = (time.perf_counter() - start) / args.steps * 1000
            print(f"  num_workers={workers}: {per_step:6.0f} ms per step ({per_step / args.compute_ms:.2f}x the compute)")


if __name__ == "__main__":
    main()
