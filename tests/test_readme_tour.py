"""The README's tour runs as written: its shell block is taken from README.md and run by bash in
a fresh folder holding a copy of configs/, stopping at the first failing command.

Substituted, and only this: `source .venv/bin/activate` (the test already runs in the project's
environment, whose bin/ is put first on PATH) and the training length: each
`diffalign train configs/...` line that trains gets `train.max_steps=2 logging.sample_every=0`
appended, to keep the test short. Everything else (generate, export-tiny, the plain-diffusers
snippet, score, export-lora) runs as a user would type it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORTER = "train.max_steps=2 logging.sample_every=0"


def tour_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A five-minute tour"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def shortened(block: str) -> str:
    lines = []
    for line in block.splitlines():
        if line.strip() == "source .venv/bin/activate":
            continue
        command = line.split("#", 1)[0].rstrip() if line.startswith("diffalign train ") else line
        if line.startswith("diffalign train ") and "--dry-run" not in line:
            line = f"{command} {SHORTER}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_readme_tour_runs_as_written(tmp_path):
    block = tour_block()
    assert "diffalign train configs/quickstart.yaml --overwrite" in block and "export-lora" in block
    script = shortened(block)
    assert script.count(SHORTER) == 1  # one training command, shortened; nothing else changed
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    # what the tour says each step leaves behind
    run = tmp_path / "runs" / "quickstart"
    for name in ("config.yaml", "metrics.jsonl", "report.html", "final/pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints").is_dir() and (tmp_path / "shapes.png").is_file() and (tmp_path / "shapes-diffusers.png").is_file()
    assert sorted(p.name for p in (tmp_path / "samples" / "dpo").iterdir()) == ["00000.png", "00001.png", "00002.png", "prompts.txt"]
    for table in ("base.csv", "dpo.csv"):
        assert len((tmp_path / table).read_text().splitlines()) == 4  # a header and one row per image
    assert (tmp_path / "quickstart-lora.safetensors").is_file()
