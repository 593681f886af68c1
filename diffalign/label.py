"""Human labelling of image pairs in the browser: ``diffalign label PAIRS_DIR``.

    diffalign sample configs/d3po/sd15.yaml --out feedback/      # pairs + labels.jsonl template
    diffalign label feedback/ [--name alice] [--port 8765]       # serve the page on 127.0.0.1
    diffalign train configs/d3po/sd15.yaml d3po.reward=null d3po.labels=feedback/labels-alice.jsonl
    diffalign label export feedback/ --out picks/                # Pick-a-Pic parquet (Diffusion-DPO / NPO)

The page shows each pair side by side with its prompt; the person picks with the mouse or the
keys 1 / 2 (left / right image), t (tie), s (skip), u (undo the last choice), and sees progress
and an ETA. Every labeller (a name typed on the page, or ``--name``) has a file of their own,
``PAIRS_DIR/labels-<name>.jsonl``, in the template's format (one line per pair; ``choice`` 0, 1,
"tie", "skip" or null), so it feeds D3PO's ``d3po.labels`` as it is. Each choice rewrites that
file atomically (temporary file, fsync, rename) before the page moves on, so a dead server or
browser loses nothing; a restart resumes at the first pair with no choice. With several
labellers the page and ``label export`` report how often each two agree.

The web stack (FastAPI + uvicorn, plain HTML/JS shipped in ``diffalign/static``, no CDN) is the
``label`` extra: ``pip install 'diffalign[label]'``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

from diffalign.errors import UserError

TEMPLATE = "labels.jsonl"
STATIC = Path(__file__).parent / "static"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")
CHOICES = (0, 1, "tie", "skip")


def read_template(pairs_dir: Path) -> list[dict]:
    """The pairs of ``pairs_dir/labels.jsonl`` (written by ``diffalign sample``), in order."""
    path = pairs_dir / TEMPLATE
    if not path.is_file():
        raise UserError(f"{pairs_dir}: no {TEMPLATE}; write pairs with `diffalign sample CONFIG --out {pairs_dir}`")
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                pairs.append({k: record[k] for k in ("pair_id", "prompt", "image_0", "image_1")})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: not a pair line of `diffalign sample` (pair_id, prompt, image_0, image_1)") from None
    if not pairs:
        raise UserError(f"{path} holds no pairs")
    return pairs


def labels_path(pairs_dir: Path, name: str) -> Path:
    return pairs_dir / f"labels-{name}.jsonl"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UserError(f"labeller name {name!r}: use 1-40 letters, digits, '-' or '_'")
    return name


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old file or the new one."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class LabelBook:
    """One labeller's choices on one folder of pairs, kept in ``labels-<name>.jsonl``.

    ``choices``: pair_id -> {"choice", "seq", "time"}; ``seq`` orders the choices for undo.
    """

    def __init__(self, pairs_dir: Path, pairs: list[dict], name: str) -> None:
        self.path = labels_path(pairs_dir, check_name(name))
        self.pairs, self.name = pairs, name
        self.choices: dict[str, dict] = {}
        if self.path.is_file():
            known = {p["pair_id"] for p in pairs}
            for line in self.path.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if record.get("pair_id") in known and record.get("choice") is not None:
                    self.choices[record["pair_id"]] = {k: record.get(k) for k in ("choice", "seq", "time")}

    def _write(self) -> None:
        lines = []
        for pair in self.pairs:
            mine = self.choices.get(pair["pair_id"], {"choice": None, "seq": None, "time": None})
            lines.append(json.dumps({**pair, **mine, "labeller": self.name}))
        write_atomically(self.path, "\n".join(lines) + "\n")

    def choose(self, pair_id: str, choice) -> None:
        if pair_id not in {p["pair_id"] for p in self.pairs}:
            raise UserError(f"pair {pair_id!r} is not in this folder")
        if choice not in CHOICES or isinstance(choice, bool):
            raise UserError(f"choice {choice!r}: expected 0, 1, 'tie' or 'skip'")
        seq = max((c["seq"] or 0 for c in self.choices.values()), default=0) + 1
        self.choices[pair_id] = {"choice": choice, "seq": seq, "time": round(time.time(), 3)}
        self._write()

    def undo(self) -> str | None:
        """Forget the latest choice; returns its pair id (None when nothing is labelled)."""
        if not self.choices:
            return None
        pair_id = max(self.choices, key=lambda p: self.choices[p]["seq"] or 0)
        del self.choices[pair_id]
        self._write()
        return pair_id

    def next_index(self) -> int | None:
        return next((i for i, p in enumerate(self.pairs) if p["pair_id"] not in self.choices), None)


def read_all_labels(pairs_dir: Path) -> dict[str, dict[str, object]]:
    """labeller -> {pair_id: choice} for every ``labels-*.jsonl`` in ``pairs_dir`` (choices only)."""
    books = {}
    for path in sorted(pairs_dir.glob("labels-*.jsonl")):
        name = path.stem[len("labels-"):]
        books[name] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("choice") is not None:
                books[name][record["pair_id"]] = record["choice"]
    return books


def agreement(books: dict[str, dict[str, object]]) -> list[dict]:
    """For each two labellers: pairs both picked a winner (0 / 1) for, and how many they agree on."""
    report = []
    for a, b in itertools.combinations(sorted(books), 2):
        shared = [p for p in books[a] if p in books[b] and books[a][p] in (0, 1) and books[b][p] in (0, 1)]
        agree = sum(books[a][p] == books[b][p] for p in shared)
        report.append({"labellers": [a, b], "pairs": len(shared), "agree": agree,
                       "rate": round(agree / len(shared), 3) if shared else None})
    return report


def describe_agreement(report: list[dict]) -> list[str]:
    return [f"{r['labellers'][0]} vs {r['labellers'][1]}: agree on {r['agree']}/{r['pairs']} pairs"
            + (f" ({r['rate']:.0%})" if r["rate"] is not None else "") for r in report]


# --- the web app ------------------------------------------------------------------------------


def create_app(pairs_dir: str | os.PathLike, default_name: str | None = None):
    """The FastAPI app serving the page, the images and the labelling API for ``pairs_dir``."""
    try:
        from fastapi import Body, FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError:
        raise UserError("diffalign label needs the label extra: pip install 'diffalign[label]'") from None

    pairs_dir = Path(pairs_dir)
    pairs = read_template(pairs_dir)
    images_root = pairs_dir.resolve()
    books: dict[str, LabelBook] = {}
    lock = threading.Lock()
    app = FastAPI(title="diffalign label", docs_url=None, redoc_url=None, openapi_url=None)

    def book(name) -> LabelBook:
        try:
            check_name(name)
        except UserError as err:
            raise HTTPException(400, str(err)) from None
        if name not in books:
            books[name] = LabelBook(pairs_dir, pairs, name)
        return books[name]

    def state(b: LabelBook) -> dict:
        index = b.next_index()
        current = None
        if index is not None:
            pair = pairs[index]
            current = {"index": index, "pair_id": pair["pair_id"], "prompt": pair["prompt"],
                       "image_0": f"/files/{pair['image_0']}", "image_1": f"/files/{pair['image_1']}"}
        return {"name": b.name, "total": len(pairs), "done": len(b.choices), "pair": current,
                "labels_file": str(b.path), "agreement": describe_agreement(agreement(read_all_labels(pairs_dir)))}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        html = (STATIC / "label.html").read_text()
        return html.replace("__DEFAULT_NAME__", json.dumps(default_name or ""))

    @app.get("/label.js")
    def script():
        return FileResponse(STATIC / "label.js", media_type="text/javascript")

    @app.get("/files/{path:path}")
    def image(path: str):
        target = (pairs_dir / path).resolve()
        if images_root not in target.parents or not target.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(target)

    @app.get("/api/state")
    def get_state(name: str) -> dict:
        with lock:
            return state(book(name))

    @app.post("/api/choice")
    def post_choice(payload: dict = Body(...)) -> dict:
        with lock:
            b = book(payload.get("name"))
            try:
                b.choose(str(payload.get("pair_id")), payload.get("choice"))
            except UserError as err:
                raise HTTPException(400, str(err)) from None
            return state(b)

    @app.post("/api/undo")
    def post_undo(payload: dict = Body(...)) -> dict:
        with lock:
            b = book(payload.get("name"))
            b.undo()
            return state(b)

    return app


def make_server(pairs_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765, name: str | None = None):
    """A uvicorn server for the page (``.run()`` serves until ``.should_exit`` is set or Ctrl-C)."""
    app = create_app(pairs_dir, name)
    try:
        import uvicorn
    except ImportError:
        raise UserError("diffalign label needs the label extra: pip install 'diffalign[label]'") from None
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


# --- Pick-a-Pic export ------------------------------------------------------------------------


def export_pickapic(pairs_dir: str | os.PathLike, out: str | os.PathLike, name: str | None = None) -> tuple[Path, int]:
    """Write ``out/train.parquet`` in the Pick-a-Pic schema (caption, jpg_0, jpg_1 image bytes,
    label_0: 1 = image 0 wins, 0 = image 1 wins, 0.5 = tie) for ``data.source: out``.

    One labeller's labels with ``name``; otherwise every labeller's, by majority (an even split
    is a tie). Skipped and unlabelled pairs are left out. Returns (file, rows).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("diffalign label export needs pyarrow: pip install 'diffalign[label]'") from None

    pairs_dir, out = Path(pairs_dir), Path(out)
    pairs = read_template(pairs_dir)
    books = read_all_labels(pairs_dir)
    if name is not None:
        if name not in books:
            raise UserError(f"--name {name}: no labels-{name}.jsonl in {pairs_dir} (labellers: {', '.join(books) or 'none'})")
        books = {name: books[name]}
    if out.exists():
        raise UserError(f"--out {out} exists; give a new folder (export never overwrites)")
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for pair in pairs:
        votes = [b[pair["pair_id"]] for b in books.values() if b.get(pair["pair_id"]) in (0, 1, "tie")]
        if not votes:
            continue
        score = sum({0: 1.0, 1: 0.0, "tie": 0.5}[v] for v in votes) / len(votes)
        rows["caption"].append(pair["prompt"])
        rows["jpg_0"].append((pairs_dir / pair["image_0"]).read_bytes())
        rows["jpg_1"].append((pairs_dir / pair["image_1"]).read_bytes())
        rows["label_0"].append(1.0 if score > 0.5 else 0.0 if score < 0.5 else 0.5)
    if not rows["caption"]:
        raise UserError(f"{pairs_dir}: no labelled pairs to export; label some with `diffalign label {pairs_dir}`")
    table = pa.table({"caption": pa.array(rows["caption"], pa.string()), "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
                      "jpg_1": pa.array(rows["jpg_1"], pa.binary()), "label_0": pa.array(rows["label_0"], pa.float64())})
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    pq.write_table(table, tmp / "train.parquet")
    os.rename(tmp, out)
    return out / "train.parquet", len(rows["caption"])


# --- the command ------------------------------------------------------------------------------


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="+", metavar="PAIRS_DIR | export PAIRS_DIR",
                        help="a folder written by `diffalign sample`; `export PAIRS_DIR --out DIR` writes Pick-a-Pic parquet")
    parser.add_argument("--name", help="labeller name (default: typed on the page); with export: only this labeller")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", help="export: a new folder for train.parquet")


def run_label(args: argparse.Namespace) -> int:
    if args.target[0] == "export":
        if len(args.target) != 2 or not args.out:
            raise UserError("usage: diffalign label export PAIRS_DIR --out DIR [--name NAME]")
        path, count = export_pickapic(args.target[1], args.out, args.name)
        for line in describe_agreement(agreement(read_all_labels(Path(args.target[1])))):
            print(line)
        print(f"wrote {count} labelled pairs to {path}; train Diffusion-DPO / NPO with data.source={args.out}")
        return 0
    if len(args.target) != 1:
        raise UserError(f"diffalign label takes one PAIRS_DIR, got {' '.join(args.target)}")
    pairs_dir = Path(args.target[0])
    if args.name is not None:
        check_name(args.name)
    read_template(pairs_dir)
    for line in describe_agreement(agreement(read_all_labels(pairs_dir))):
        print(line)
    print(f"labelling {pairs_dir} at http://{args.host}:{args.port}/ (Ctrl-C stops; every choice is already saved)")
    print(f"each labeller's choices go to {pairs_dir}/labels-NAME.jsonl; train with d3po.labels=that file")
    make_server(pairs_dir, args.host, args.port, args.name).run()
    return 0
