"""How long the command line takes to start: `diffalign --help`, `diffalign score --help`, and
`diffalign score` up to its first answer (a one-line error for a missing folder), against
`python -c "import torch"` as the floor of any command that touches a model.

    python bench/cli_startup.py [--repeats 5]

Goal: under 2 s for `--help` and `score` on an idle 2-core machine. Each command runs in a fresh
process, in turn (interleaved, so drift hits all alike); medians are printed with the load
average, since on a shared machine the numbers mean little when it is busy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    diffalign = shutil.which("diffalign") or sys.exit("diffalign is not on PATH: activate the venv first")
    missing = os.path.join(tempfile.mkdtemp(), "no-such-folder")
    commands = {
        "diffalign --help": [diffalign, "--help"],
        "diffalign score --help": [diffalign, "score", "--help"],
        "diffalign score MISSING --reward brightness": [diffalign, "score", missing, "--reward", "brightness"],
        "diffalign rewards": [diffalign, "rewards"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats + 1):  # the first round warms the file cache and is dropped
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            times[name].append(time.perf_counter() - start)
    print(f"load average before/after: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); "
          f"median of {args.repeats} fresh processes each:")
    for name, values in times.items():
        median = statistics.median(values[1:])
        verdict = "" if name.startswith("python") else ("  ok" if median < GOAL_S else f"  over the {GOAL_S:.0f} s goal")
        print(f"  {median:6.2f} s  {name}{verdict}")


if __name__ == "__main__":
    main()
