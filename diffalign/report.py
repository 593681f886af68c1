"""The training report: one self-contained ``report.html`` per run directory.

Built only from what the run wrote to disk, so ``diffalign report RUN_DIR`` rebuilds it at any
time (also for a run still in progress, or one that stopped)::

    RUN_DIR/config.yaml     the resolved config          -> shown as YAML
    RUN_DIR/log.txt         what the run printed         -> the batch arithmetic and start-up lines
    RUN_DIR/metrics.jsonl   one JSON object per record   -> plots against step, the guard's verdicts
    RUN_DIR/samples/step-N.png (+ .txt prompts)          -> the sample grids side by side

Plots are matplotlib PNGs embedded as base64 ``data:`` URIs and the page has no scripts or links
to fetch: it opens offline, from a mail attachment or a cluster's scratch disk. A plot whose
metrics the run did not log is left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path

REPORT_NAME = "report.html"

# (title, y label, which metric names belong to it). The first matching group takes a key.
PLOT_GROUPS: list[tuple[str, str, object]] = [
    ("loss", "loss", lambda k: k == "loss" or k.endswith("_loss") or k.endswith("/loss")),
    ("training reward", "reward", lambda k: k in ("reward", "reward_mean")),
    ("held-out reward", "reward", lambda k: k.startswith("eval/") or k == "guard/heldout_reward"),
    ("diversity", "mean pairwise distance", lambda k: k == "guard/diversity" or k.endswith("diversity")),
    ("KL / drift from the base", "KL or drift", lambda k: "kl" in k.split("/")[-1] or "drift" in k),
    ("gradient norm", "norm before clipping", lambda k: k == "grad_norm"),
    ("learning rate", "lr", lambda k: k == "lr"),
]
NOT_PLOTTED = {"step", "time", "epoch", "guard/hacking", "guard/best_step", "guard/best_heldout", "guard/train_reward"}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in order (an unreadable last line, as from a killed run, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def metric_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric metric as (steps, values), in the order first logged; nulls (NaN/inf) are skipped."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(record["step"]))
            values.append(float(value))
    return series


def group_series(series: dict) -> list[tuple[str, str, dict]]:
    """The plots to draw: (title, y label, {metric: (steps, values)}) for each group with data,
    then one group "other metrics" for the rest that changed during the run."""
    taken: set[str] = set()
    groups = []
    for title, ylabel, belongs in PLOT_GROUPS:
        members = {k: v for k, v in series.items() if k not in taken and belongs(k)}
        taken.update(members)
        if members:
            groups.append((title, ylabel, members))
    rest = {k: v for k, v in series.items() if k not in taken and len(set(v[1])) > 1}  # constants say nothing
    if rest:
        groups.append(("other metrics", "value", rest))
    return groups


def guard_verdicts(records: list[dict]) -> list[dict]:
    """The records carrying a guard verdict (``guard/verdict``), in order."""
    return [r for r in records if isinstance(r.get("guard/verdict"), str)]


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_png(title: str, ylabel: str, members: dict, verdicts: list[dict]) -> bytes:
    """One line plot against step (one line per metric; at most 6 panels for "other metrics"),
    with the steps the guard called "hacking" marked. Returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    separate = title == "other metrics"
    names = list(members)[:12] if separate else list(members)
    cols = min(3, len(names)) if separate else 1
    rows = math.ceil(len(names) / cols) if separate else 1
    fig = Figure(figsize=(4.2 * cols if separate else 5.6, 2.6 * rows if separate else 3.2), dpi=80)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(len(names))] if separate else [fig.add_subplot()]
    hacking_steps = [r["step"] for r in verdicts if r.get("guard/verdict") == "hacking"]
    for i, name in enumerate(names):
        ax = axes[i] if separate else axes[0]
        steps, values = members[name]
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=name)
        if separate:
            ax.set_title(name, fontsize=9)
        for s in hacking_steps:
            ax.axvline(s, color="tab:red", alpha=0.35, linewidth=1)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "learning rate" or (title == "gradient norm" and _spans_decades(members)):
            ax.set_yscale("log")
    if not separate:
        axes[0].set_title(title)
        axes[0].set_ylabel(ylabel)
        axes[0].legend(fontsize=8)
    # fixed margins: tight_layout doubles the drawing time, and a report is drawn at every checkpoint
    if separate:
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2 / rows, top=1 - 0.1 / rows, hspace=0.7, wspace=0.3)
    else:
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _spans_decades(members: dict) -> bool:
    values = [v for _, vs in members.values() for v in vs if v > 0]
    return bool(values) and max(values) / min(values) > 100


def sample_grids(run_dir: Path) -> list[tuple[int, Path, list[str]]]:
    """(step, grid PNG, prompts) for every ``samples/step-N.png``, by step."""
    grids = []
    for path in sorted((run_dir / "samples").glob("step-*.png")):
        try:
            step = int(path.stem.split("-", 1)[1])
        except ValueError:
            continue
        prompts_file = path.with_suffix(".txt")
        prompts = prompts_file.read_text().splitlines() if prompts_file.is_file() else []
        grids.append((step, path, prompts))
    return sorted(grids, key=lambda item: item[0])


MAX_GRIDS = 12  # grids shown: the first, the last and evenly spaced ones between
MAX_GRID_SIDE = 512  # pixels; a 1024 px model's grids would make the page hundreds of MB


def spread(items: list, limit: int) -> list:
    """At most ``limit`` items: the first, the last and evenly spaced ones between."""
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def grid_thumbnail(path: Path) -> bytes:
    """The grid's PNG bytes, scaled down (nearest neighbour, so pixel art stays crisp) to at most
    ``MAX_GRID_SIDE`` pixels a side."""
    from PIL import Image

    with Image.open(path) as image:
        if max(image.size) <= MAX_GRID_SIDE:
            return path.read_bytes()
        scale = MAX_GRID_SIDE / max(image.size)
        small = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                            Image.Resampling.BOX)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { border: 1px solid #eee; }
.grids { display: flex; gap: 10px; overflow-x: auto; padding-bottom: 8px; }
.grids figure { margin: 0; text-align: center; } .grids img { width: 220px; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
.hacking { color: #b00; font-weight: bold; } .ok { color: #070; } .muted { color: #777; }
"""


def _verdict_table(verdicts: list[dict]) -> str:
    if not verdicts:
        return "<p class='muted'>No guard verdicts (the guard is on when <code>eval.reward</code> is set).</p>"
    columns = [("step", "step"), ("guard/verdict", "verdict"), ("guard/reason", "why"),
               ("guard/train_reward", "training reward"), ("guard/heldout_reward", "held-out reward"),
               ("guard/best_heldout", "best held-out"), ("guard/diversity", "diversity"), ("guard/action", "action")]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    rows = []
    for record in verdicts:
        cells = []
        for key, _ in columns:
            value = record.get(key)
            text = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
            css = {"hacking": "hacking", "ok": "ok"}.get(text, "") if key == "guard/verdict" else ""
            cells.append(f"<td class='{css}'>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def build_report(run_dir: str | Path) -> str:
    """The HTML text of the report of ``run_dir`` (see the module docstring for what it reads)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else "(no config.yaml)"
    log_path = run_dir / "log.txt"
    log_text = log_path.read_text() if log_path.is_file() else ""
    records = read_metrics(run_dir)
    verdicts = guard_verdicts(records)
    steps = [r["step"] for r in records]

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>diffalign report: "
             f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"]
    parts.append(f"<h1>diffalign run <code>{html.escape(str(run_dir))}</code></h1>")
    summary = f"{len(records)} metric records, last step {max(steps)}" if steps else "no metrics logged yet"
    parts.append(f"<p>{html.escape(summary)}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>")

    parts.append("<h2>Reward-hacking guard</h2>")
    hacking = [v for v in verdicts if v["guard/verdict"] == "hacking"]
    if verdicts:
        last = verdicts[-1]
        line = (f"{len(verdicts)} checks, {len(hacking)} called hacking"
                + (f" (first at step {hacking[0]['step']})" if hacking else "")
                + (f"; best held-out reward {last['guard/best_heldout']:.4g} at step {last['guard/best_step']:g}"
                   if isinstance(last.get("guard/best_heldout"), (int, float)) and "guard/best_step" in last else ""))
        parts.append(f"<p>{html.escape(line)}.</p>")
    parts.append(_verdict_table(verdicts))

    parts.append("<h2>Metrics against step</h2><div class='plots'>")
    for title, ylabel, members in group_series(metric_series(records)):
        uri = _png_data_uri(plot_png(title, ylabel, members, verdicts))
        parts.append(f"<img class='plot' alt='{html.escape(title)}' title='{html.escape(title)}' src='{uri}'>")
    parts.append("</div>")

    grids = sample_grids(run_dir)
    parts.append("<h2>Samples over training (same prompts and seeds)</h2>")
    if grids:
        prompts = grids[-1][2]
        if prompts:
            listed = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
            parts.append(f"<p>Prompts, left to right and top to bottom:</p><ol>{listed}</ol>")
        parts.append("<div class='grids'>")
        for step, path, _ in spread(grids, MAX_GRIDS):
            uri = _png_data_uri(grid_thumbnail(path))
            parts.append(f"<figure><img class='grid' alt='samples at step {step}' src='{uri}'>"
                         f"<figcaption>step {step}</figcaption></figure>")
        parts.append("</div>")
    else:
        parts.append("<p class='muted'>No sample grids (set <code>logging.sample_every</code>).</p>")

    parts.append("<h2>Batch arithmetic and start-up</h2>")
    parts.append(f"<pre>{html.escape(log_text) if log_text else '(no log.txt)'}</pre>")
    parts.append(f"<h2>Resolved config</h2><pre>{html.escape(config_text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` atomically (a reader never sees half a file); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from diffalign.errors import UserError

        raise UserError(f"report: {run_dir} is not a run directory (expected config.yaml and metrics.jsonl in it)")
    text = build_report(run_dir)
    target = run_dir / REPORT_NAME
    partial = run_dir / f".{REPORT_NAME}.tmp"
    partial.write_text(text)
    partial.replace(target)
    return target
