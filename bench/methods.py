"""The methods table: every method that applies to each family, at equal compute, 3 seeds each.

    python bench/methods.py                      # the full table on the shapes world
    python bench/methods.py --quick              # a subset (one family, 1 seed, smaller budget)
    python bench/methods.py --size tiny --quick  # the same code path on the random tiny models (CI)

For each family the base model is evaluated once; then each method trains a LoRA from it with
the same compute budget, counted in **denoiser forward-pass equivalents**: one image through the
denoiser once is 1, its backward 2 more (so a training pass is 3), classifier-free guidance's
doubled batch counts twice; reward models and the VAE are not counted. A counter on every
denoiser call measures it (so gradient checkpointing's recomputation is counted too). A short
calibration run measures each method's cost per optimizer step, which sets its ``max_steps``.

Each run keeps the guard on with ``action: warn, keep_best: false`` (the table reports the last
weights, not a held-out-selected checkpoint); the guard's checks along the run give
the held-out reward against compute for the plot (``--checks`` points after the start), with the
counter paused while they sample.

Columns: held-out verifiable reward (the world's gold reward on held-out prompts, fixed seeds)
before -> after as mean ± std over seeds; the learned reward on the same images; diversity (mean
pairwise RMS pixel distance between one prompt's images over seeds); drift from the base (mean
squared difference of the denoiser outputs with and without the LoRA on fixed inputs); the
measured compute; training wall time (evaluation excluded) and peak memory (CUDA: peak allocated;
CPU: peak resident memory of the process during the run above its level at the start).

Outputs in ``--out`` (default runs/bench-methods): ``methods.md`` (the table), ``methods.png``
(held-out reward against compute, one curve per method and family), ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

DENOISER_CLASSES = {"UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel"}
# the families each method applies to (D3PO's per-step log-probs are DDIM's; NPO / Self-NPO train
# negative models used through guidance at inference, so a reward table of their LoRA says nothing)
METHOD_FAMILIES = {
    "diffusion_dpo": ("sd", "sdxl", "flux", "sd3"),
    "d3po": ("sd", "sdxl"),
    "grpo": ("sd", "sdxl", "flux", "sd3"),
    "pref_grpo": ("sd", "sdxl", "flux", "sd3"),
    "draft": ("sd", "sdxl", "flux", "sd3"),
    "adjoint_matching": ("sd", "sdxl", "flux", "sd3"),
    "diffusion_nft": ("sd", "sdxl", "flux", "sd3"),
}
COLUMNS = [
    "family", "method", "trained on", "steps", "compute (fwd-eq)", "held-out verifiable", "learned",
    "diversity", "drift (output MSE)", "wall s", "peak MB",
]  # fmt: skip


@dataclass
class World:
    """Models, rewards and prompts of one bench world."""

    name: str
    models: dict[str, str]
    verifiable: str  # the gold reward, on held-out prompts
    learned: str  # the differentiable learned reward
    train_prompts: list[str]
    heldout_prompts: list[str]
    dpo_source: str
    num_steps: int  # sampler steps, for training and evaluation
    seeds_per_prompt: int = 2
    eval_guidance: float | None = None  # CFG scale of the held-out samples; None = the family default
    recipes: bool = False  # start from configs/<method>/shapes-<family>.yaml when it exists
    budget: int = 2000  # forward-pass equivalents per run
    quick_budget: int = 600
    learning_rate: float = 1e-3


def tiny_world() -> World:
    """The random tiny models: brightness stands in for the verifiable reward, saturation for the learned."""
    return World(
        name="tiny", models={f: f"tiny-{f}" for f in ("sd", "sdxl", "flux", "sd3")},
        verifiable="brightness", learned="saturation",
        train_prompts=["a cat", "a dog", "a red house", "a tree"], heldout_prompts=["a blue car", "a green field"],
        dpo_source="builtin:brightness", num_steps=2, budget=1200, quick_budget=300, learning_rate=1e-2,
    )  # fmt: skip


def shapes_world() -> World:
    """The trained shapes world (diffalign.rewards.shapes_world): gold shapes_geneval, learned shapes_pref."""
    from diffalign.rewards import shapes_world as world
    from diffalign.world import SHAPES_GUIDANCE

    # the world's alignment split of its held-out prompts (train on one half, measure on the other)
    train = list(getattr(world, "ALIGN_TRAIN_PROMPTS", world.TRAIN_PROMPTS))
    heldout = list(getattr(world, "ALIGN_EVAL_PROMPTS", world.HELD_OUT_PROMPTS))
    step = max(1, len(heldout) // 8)
    return World(
        name="shapes", models={f: f"shapes-{f}" for f in ("sd", "sdxl", "flux", "sd3")},
        verifiable="shapes_geneval:partial=true", learned="shapes_pref",
        train_prompts=train, heldout_prompts=heldout[::step][:8],
        dpo_source="builtin:shapes", num_steps=10, eval_guidance=SHAPES_GUIDANCE, recipes=True, budget=1500, quick_budget=1000,
    )  # fmt: skip


# --- measuring ----------------------------------------------------------------------------------


class DenoiserCounter:
    """Counts denoiser passes in images: every call of a UNet / FLUX / SD3 transformer on a batch
    of B adds B, and B x 2 more when its output's gradient is computed (the backward)."""

    def __init__(self) -> None:
        self.count = 0
        self.paused = False
        self._handle = None

    def __enter__(self) -> "DenoiserCounter":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, output) -> None:
        if self.paused or type(module).__name__ not in DENOISER_CLASSES:
            return
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        batch = out.shape[0]
        self.count += batch
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(batch))

    def _backward(self, batch: int) -> None:
        if not self.paused:
            self.count += 2 * batch


class PeakMemory:
    """Peak memory during a block: CUDA peak allocated, else the resident set sampled every 10 ms
    above its level at the start. ``mb`` after the block."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = (max(self.peak, _rss()) - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- configs ------------------------------------------------------------------------------------


def trained_reward(world: World, method: str) -> str:
    """Reward-gradient methods need the differentiable learned reward; the RL methods train on the
    verifiable one (as Flow-GRPO trains on GenEval); Pref-GRPO's pairs are judged by the learned one."""
    if method in ("draft", "adjoint_matching", "pref_grpo"):
        return world.learned
    if method == "diffusion_dpo":
        return world.dpo_source
    return world.verifiable


def method_config(world: World, family: str, method: str, seed: int, max_steps: int, out: Path,
                  guard: bool = True, checks: int = 4) -> dict:
    """The run's config: the world's recipe if it has one, else a small generic one; then the bench's
    seed, steps, output, held-out evaluation and guard."""
    recipe = Path(__file__).resolve().parent.parent / "configs" / method / f"shapes-{family}.yaml"
    if world.recipes and recipe.is_file():
        cfg = yaml.safe_load(recipe.read_text())
    else:
        cfg = _generic_config(world, method, family)
    cfg.update(method=method, model=world.models[family], seed=seed, output_dir=str(out))
    cfg.setdefault("train", {}).update(max_steps=max_steps, checkpoint_every=0)
    cfg.setdefault("logging", {}).update(sample_every=0, report=False, report_to=[])
    cfg["eval"] = {"reward": world.verifiable, "prompts": world.heldout_prompts, "seed": 1000,
                   "num_images_per_prompt": world.seeds_per_prompt, "num_steps": world.num_steps, "guidance_scale": world.eval_guidance}
    cfg["guard"] = ({"enabled": True, "every": max(1, max_steps // checks), "action": "warn", "keep_best": False}
                    if guard else {"enabled": False})
    return cfg


def _generic_config(world: World, method: str, family: str) -> dict:
    steps, prompts, lr = world.num_steps, world.train_prompts, world.learning_rate
    train = {"learning_rate": lr, "batch_size": 2, "lr_scheduler": "constant"}
    base = {"lora": {"rank": 4}, "train": train}
    if method == "diffusion_dpo":
        return {**base, "dpo": {"beta": 500.0}, "data": {"source": world.dpo_source}}
    if method == "d3po":
        return {**base, "d3po": {"reward": world.verifiable, "prompts": prompts, "num_steps": steps, "beta": 1.0}}
    if method in ("grpo", "pref_grpo"):
        train["batch_size"] = 4
        return {**base, method: {"reward": trained_reward(world, method), "prompts": prompts, "group_size": 4,
                                 "num_steps": steps, "clip_range": 0.2}}
    if method == "diffusion_nft":
        train["batch_size"] = 4
        return {**base, "nft": {"reward": world.verifiable, "prompts": prompts, "group_size": 4,
                                "num_steps": max(2, steps), "solver": "dpm2" if family in ("flux", "sd3") else "euler"}}
    if method == "draft":
        return {**base, "draft": {"reward": world.learned, "prompts": prompts, "num_steps": steps, "k": 1}}
    if method == "adjoint_matching":
        return {**base, "adjoint_matching": {"reward": world.learned, "prompts": prompts, "num_steps": max(2, steps),
                                             "timesteps_per_trajectory": 2, "reward_multiplier": 1e3}}
    raise ValueError(f"no generic bench config for {method}")


def steps_per_unit(cfg: dict) -> int:
    """Optimizer steps that make one repeating unit of work (a GRPO round; else 1)."""
    for key in ("grpo", "pref_grpo", "nft"):
        if key in cfg:
            s, train = cfg[key], cfg["train"]
            per_step = train.get("batch_size", 1) * train.get("gradient_accumulation_steps", 1)
            return max(1, s.get("num_inner_epochs", 1) * s.get("prompts_per_round", 1) * s.get("group_size", 8) // per_step)
    return 1


# --- one run ---------------------------------------------------------------------------------------


def measure_policy(policy, world: World, learned_reward, verifiable_reward) -> dict[str, float]:
    """Held-out verifiable and learned reward, diversity and drift of the policy as it is now, on
    the world's held-out prompts x seeds (deterministic sampler)."""
    from diffalign.guard import output_drift, pairwise_diversity
    from diffalign.training import sample_images

    with torch.no_grad():
        images = torch.stack([
            sample_images(policy, world.heldout_prompts, 1000 + k, world.num_steps, world.eval_guidance).float()
            for k in range(world.seeds_per_prompt)
        ])  # [K, P, 3, H, W]  # fmt: skip
        flat, prompts = images.flatten(0, 1), list(world.heldout_prompts) * world.seeds_per_prompt
        return {"verifiable": verifiable_reward(flat, prompts).float().mean().item(),
                "learned": learned_reward(flat, prompts).float().mean().item(),
                "diversity": pairwise_diversity(images),
                "drift": output_drift(policy, world.heldout_prompts, world.num_steps)}


def _train(cfg: dict, counter: DenoiserCounter, world: World) -> tuple[float, float, list[dict]]:
    """Train ``cfg`` with the counter on: (wall s, peak MB, the guard's checks). Evaluation is not
    training: at each guard check the counter and the clock pause while :func:`measure_policy`
    measures (and notes the compute spent so far); the trainer's own start/end evaluation is
    skipped (the guard's first and last checks are the before and after)."""
    from diffalign.config import get_method, load_config
    from diffalign.guard import RewardHackingGuard
    from diffalign.training import load_frozen_reward

    config = load_config(cfg)
    _, trainer_cls = get_method(config.method)
    spent, checks = [0.0], []

    def measure(guard):  # replaces RewardHackingGuard.measure: the same held-out reward, plus the rest
        counter.paused, start = True, time.perf_counter()
        try:
            learned = load_frozen_reward(world.learned, guard.run.device)
            result = measure_policy(guard.policy, world, learned, guard.reward)
            checks.append({"compute": counter.count, **result})
            guard.drift = result["drift"]
            return result["verifiable"], result["diversity"]
        finally:
            counter.paused = False
            spent[0] += time.perf_counter() - start

    saved = [(RewardHackingGuard, "measure", RewardHackingGuard.measure), (trainer_cls, "evaluate", trainer_cls.evaluate)]
    RewardHackingGuard.measure = measure
    trainer_cls.evaluate = lambda self, *args, **kwargs: {}
    start = time.perf_counter()
    try:
        with PeakMemory() as memory:
            trainer_cls(config, overwrite=True).train()
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)
    return time.perf_counter() - start - spent[0], memory.mb, checks


def evaluate_base(world: World, family: str) -> dict[str, float]:
    """:func:`measure_policy` of the family's base model."""
    from diffalign.pipelines.loading import load_policy
    from diffalign.training import load_frozen_reward

    policy = load_policy(world.models[family])
    learned, verifiable = (load_frozen_reward(name, policy.device) for name in (world.learned, world.verifiable))
    return measure_policy(policy, world, learned, verifiable)


@dataclass
class MethodResult:
    family: str
    method: str
    trained_on: str
    max_steps: int
    runs: list[dict] = field(default_factory=list)  # per seed


def run_method(world: World, family: str, method: str, seeds: list[int], budget: int, out: Path,
               checks: int = 4) -> MethodResult:
    """Calibrate the cost per step, then train each seed at ``budget`` and evaluate it."""
    probe = method_config(world, family, method, 0, 1, out / "calibrate", guard=False)
    unit = steps_per_unit(probe)
    probe["train"]["max_steps"] = unit
    if method == "diffusion_dpo":  # a world's pairs are sampled from the base model once, then cached: not training
        _train(probe, DenoiserCounter(), world)  # a counter never entered counts nothing
    with DenoiserCounter() as counter:
        _train(probe, counter, world)
    per_step = counter.count / unit
    max_steps = max(unit, round(budget / per_step / unit) * unit)
    result = MethodResult(family, method, trained_reward(world, method), max_steps)
    for seed in seeds:
        run_dir = out / f"{family}-{method}-seed{seed}"
        cfg = method_config(world, family, method, seed, max_steps, run_dir, checks=checks)
        with DenoiserCounter() as counter:
            wall, mb, measured = _train(cfg, counter, world)
        measured[0]["compute"] = 0  # the start check runs inside step 1, before its update: the base weights
        after = measured[-1]  # the guard checks at the last step too: the final weights
        result.runs.append({"seed": seed, "compute": counter.count, "wall_s": wall, "peak_mb": mb, "after": after,
                            "curve": [(m["compute"], m["verifiable"]) for m in measured], "checks": measured})
        print(f"  {family} {method} seed {seed}: {max_steps} steps, {counter.count} fwd-eq, {wall:.1f} s, "
              f"held-out {after['verifiable']:.3f}, learned {after['learned']:.3f}", flush=True)
    return result


# --- the table and the plot ------------------------------------------------------------------------


def _mean_std(values: list[float], fmt: str = ".3f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def markdown_table(world: World, budget: int, before: dict[str, dict], results: list[MethodResult]) -> str:
    """The table: one row per (family, method); before -> after as mean ± std over seeds."""
    lines = [
        f"World `{world.name}`; budget {budget} denoiser forward-pass equivalents per run (one image through "
        "the denoiser = 1, its backward = 2, CFG's doubled batch counted; reward models and VAE not counted); "
        f"{len(results[0].runs) if results else 0} seed(s) each; held-out: {len(world.heldout_prompts)} prompts x "
        f"{world.seeds_per_prompt} seeds, {world.num_steps} sampler steps; values before -> after.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        b = before[r.family]
        after = lambda key: [run["after"][key] for run in r.runs]  # noqa: E731
        row = [
            r.family, r.method, f"`{r.trained_on}`", str(r.max_steps),
            f"{statistics.mean(run['compute'] for run in r.runs):.0f}",
            f"{b['verifiable']:.3f} -> {_mean_std(after('verifiable'))}",
            f"{b['learned']:.3f} -> {_mean_std(after('learned'))}",
            f"{b['diversity']:.3f} -> {_mean_std(after('diversity'))}",
            _mean_std(after("drift"), ".2e"),
            f"{statistics.mean(run['wall_s'] for run in r.runs):.1f}",
            f"{max(run['peak_mb'] for run in r.runs):.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: list[MethodResult], path: Path, world: World) -> None:
    """Held-out verifiable reward against compute: mean over seeds, one curve per (family, method)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    families = sorted({r.family for r in results}, key=list(METHOD_FAMILIES["grpo"]).index)
    fig = Figure(figsize=(4.6 * len(families), 3.6), dpi=100)
    for i, family in enumerate(families):
        ax = fig.add_subplot(1, len(families), i + 1)
        for r in (r for r in results if r.family == family):
            points = min(len(run["curve"]) for run in r.runs)
            xs = [statistics.mean(run["curve"][j][0] for run in r.runs) for j in range(points)]
            ys = [statistics.mean(run["curve"][j][1] for run in r.runs) for j in range(points)]
            colour = f"C{list(METHOD_FAMILIES).index(r.method) % 10}"  # one colour per method in every panel
            ax.plot(xs, ys, marker="o", markersize=3, label=r.method, color=colour)
        ax.set_title(f"{world.models[family]}")
        ax.set_xlabel("denoiser forward-pass equivalents")
        ax.set_ylabel(f"held-out {world.verifiable}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="small",
                        help="small: the shapes world's pretrained models (default); tiny: the random tiny models "
                        "with rule rewards (the CI path); full: not available (the world has one size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the runs train (cpu: accelerate is told to stay on the CPU)")
    parser.add_argument("--quick", action="store_true", help="one family (sd), one seed, the quick budget")
    parser.add_argument("--families", help="comma-separated (default: all the world has; --quick: sd)")
    parser.add_argument("--methods", help="comma-separated (default: every method that applies)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 3; --quick 1)")
    parser.add_argument("--budget", type=int, help="forward-pass equivalents per run (default: the world's)")
    parser.add_argument("--checks", type=int, default=3, help="held-out checks along each run (the curve's points)")
    parser.add_argument("--out", default="runs/bench-methods")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    if args.size == "full":
        raise SystemExit("--size full: the shapes world ships one size of models (small); use --size small")
    if args.device == "cpu" and torch.cuda.is_available():  # keep accelerate off the GPU it would pick
        os.environ["ACCELERATE_USE_CPU"] = "1"

    world = tiny_world() if args.size == "tiny" else shapes_world()
    families = args.families.split(",") if args.families else (["sd"] if args.quick else list(world.models))
    methods = args.methods.split(",") if args.methods else list(METHOD_FAMILIES)
    if args.quick and not args.methods:
        methods = ["diffusion_dpo", "grpo", "draft"]
    seeds = list(range(args.seeds if args.seeds else (1 if args.quick else 3)))
    budget = args.budget or (world.quick_budget if args.quick else world.budget)
    from diffalign.config import list_methods

    available = set(list_methods())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    before, results = {}, []
    for family in families:
        before[family] = evaluate_base(world, family)
        print(f"{world.models[family]} base: {before[family]}", flush=True)
        for method in methods:
            if family not in METHOD_FAMILIES.get(method, ()) or method not in available:
                continue
            results.append(run_method(world, family, method, seeds, budget, out, args.checks))
    table = markdown_table(world, budget, before, results)
    (out / "methods.md").write_text(table)
    plot_curves(results, out / "methods.png", world)
    (out / "results.json").write_text(json.dumps(
        {"world": world.name, "budget": budget, "before": before,
         "results": [r.__dict__ for r in results], "total_s": time.perf_counter() - start}, indent=1))
    print(table)
    print(f"wrote {out / 'methods.md'}, {out / 'methods.png'}, {out / 'results.json'} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
