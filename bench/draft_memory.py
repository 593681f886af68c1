"""DRaFT memory and time: peak memory and step time for K = 1 and K = all steps, with the
per-step gradient checkpointing on and off.

Every configuration runs in a fresh subprocess (so one run's allocator state cannot hide
another's peak) through the trainer's own code path (``DraftTrainer.sample_images`` -> reward ->
``draft_loss`` -> backward -> AdamW step) on an embedded tiny model. Memory:

* on CUDA, ``torch.cuda.max_memory_allocated`` during one training step minus the allocation
  before it (the step's own memory: activations, temporaries, gradients);
* on CPU, the same quantity counted tensor by tensor: the peak total size of the live tensors the
  step creates, tracked by :class:`TensorMemory` (a dispatch mode; exact for tensor storage, blind
  to allocator caching). The process's peak RSS is printed beside it as a
  whole-process sanity check (it also holds the weights, the imports and the allocator's slack:
  glibc keeps freed blocks, so checkpointed recomputation inflates RSS far beyond the live
  tensors; ``MALLOC_MMAP_THRESHOLD_=131072`` makes RSS follow live memory much more closely).

Times are medians over ``--repeats`` steps after a warm-up step: wall clock, and this process's
CPU time, which other jobs on a shared machine disturb far less.

Usage::

    python bench/draft_memory.py                                    # tiny sd, 256 px, 20 steps, batch 2
    python bench/draft_memory.py --family sdxl --resolution 512 --steps 50 --out bench.json
    python bench/draft_memory.py --size small --family sd           # compute-bound on a CPU (bench/sizes.py)

The goal from the issue: K = all with checkpointing needs at most 1.5x the memory of K = 1 with
checkpointing. The report says whether this run meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import weakref

import torch
from sizes import add_size_arguments
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CONFIGS = [  # (label, k, checkpoint_steps)
    ("K=1, plain", 1, False),
    ("K=1, checkpointed", 1, True),
    ("K=all, plain", "all", False),
    ("K=all, checkpointed", "all", True),
]


class TensorMemory(TorchDispatchMode):
    """Peak total size (bytes) of the live tensor storages created inside the block.

    A dispatch mode sees every op's outputs, including the recomputation inside checkpointed
    backward passes; each new storage counts until its weak reference dies. Tensors that existed
    before the block (weights, optimizer state) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return

        def release(_ref, key=key, size=size) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= size

        self._live[key] = weakref.ref(storage, release)
        self.current += size
        self.peak = max(self.peak, self.current)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_child(args: argparse.Namespace) -> dict:
    """One configuration: load, warm up, measure ``args.repeats`` training steps."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffalign import lora
    from diffalign.config import load_config
    from diffalign.losses import draft_loss
    from diffalign.rewards import load_reward
    from diffalign.trainers.draft import DraftTrainer
    from sizes import build_policy

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config({
        "method": "draft", "model": f"tiny-{args.family}", "output_dir": "/tmp/unused",
        "draft": {"reward": "brightness", "num_steps": args.steps, "k": args.k, "checkpoint_steps": args.checkpoint,
                  "guidance_scale": args.guidance_scale},
        "lora": {"rank": 4},
    })
    policy = build_policy(args.family, args.size, device, resolution=args.resolution)
    params = lora.add_lora(policy.denoiser, policy.family, cfg.lora)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    reward = load_reward("brightness")
    trainer = DraftTrainer(cfg)
    generator = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "a lighthouse at dusk", "a bowl of fruit", "a city street"]
    batch = [prompts[i % len(prompts)] for i in range(args.batch)]

    def training_step() -> None:
        images, image_prompts, _ = trainer.sample_images(policy, batch, generator)
        loss, _ = draft_loss(reward(images, image_prompts).view(len(batch), -1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():  # warm-up with the same shapes: weights, caches and buffers allocated
        trainer.sample_images(policy, batch, generator)
    training_step()  # first step: lazy initialisations (optimizer state, checkpoint machinery)

    # time: wall clock and this process's CPU time (the latter is robust to other processes on the machine)
    wall, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        training_step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)

    # memory of one more step: every tensor it creates (activations, temporaries, gradients)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        training_step()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        tracker = TensorMemory()
        with tracker:
            training_step()
        extra = tracker.peak
    return {
        "device": device, "k": args.k, "checkpoint": args.checkpoint, "extra_mb": round(extra / 2**20, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "step_s": round(_median(wall), 3), "step_cpu_s": round(_median(cpu), 3),
        "wall_s": [round(t, 3) for t in wall], "cpu_s": [round(t, 3) for t in cpu],
    }


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, family="sd")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 for tiny, the size's own otherwise")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps T")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per configuration")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per run (1: steadier timings on a shared machine; 0: torch's default)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", default="1", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolution is None and args.size == "tiny":
        args.resolution = 256
    if args.child:
        args.k = args.k if args.k == "all" else int(args.k)
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    results = {}
    common = ["--size", args.size, "--family", args.family, "--device", args.device, "--steps", str(args.steps),
              "--batch", str(args.batch), "--guidance-scale", str(args.guidance_scale), "--repeats", str(args.repeats),
              "--threads", str(args.threads)]
    if args.resolution is not None:
        common += ["--resolution", str(args.resolution)]
    for label, k, checkpoint in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--k", str(k), *common]
        if checkpoint:
            cmd.append("--checkpoint")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[label] = json.loads(lines[-1][len("RESULT "):])

    device = next(iter(results.values()))["device"]
    memory = "max_memory_allocated minus allocated before" if device == "cuda" else "peak of the live tensors it creates"
    print(f"DRaFT {args.size} {args.family}, {args.resolution or 'default'} px, T={args.steps} steps, batch {args.batch}, CFG "
          f"{args.guidance_scale}, on {device} ({args.threads or 'default'} CPU threads); step memory = {memory}; "
          f"times are medians of {args.repeats} steps")
    print(f"{'configuration':<22}{'step MB':>10}{'process peak RSS MB':>21}{'wall s':>9}{'CPU s':>9}")
    for label, r in results.items():
        print(f"{label:<22}{r['extra_mb']:>10.1f}{r['peak_rss_mb']:>21.1f}{r['step_s']:>9.3f}{r['step_cpu_s']:>9.3f}")
    ratio = results["K=all, checkpointed"]["extra_mb"] / max(results["K=1, checkpointed"]["extra_mb"], 1e-6)
    verdict = "met" if ratio <= 1.5 else "NOT met"
    print(f"K=all / K=1 extra memory with checkpointing: {ratio:.2f}x (goal <= 1.5x: {verdict})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratio_all_over_1_checkpointed": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
