"""Start-up: how long the CLI's light commands take as whole processes, and a search worker's
start-up (a fresh process importing the evaluator and training nothing).

Target (issue 15): ``nos-sym parse``, ``tree``, ``top``, ``status`` answer in ≤ 0.8 s. The
reference in the same run is ``python -c pass`` (the interpreter alone) and ``import torch``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_section

NOS_SYM = str(Path(sys.executable).with_name("nos-sym"))
RULE = "sign_g sign_m id id mul ; o1 g exp id mul"


def seconds(command: list[str], repeats: int) -> float:
    """Median wall time of ``command`` as a fresh process (one untimed run first)."""
    subprocess.run(command, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_run(root: Path) -> Path:
    """A finished 6-evaluation search on the synthetic data set (inline backend)."""
    run_dir = root / "run"
    subprocess.run(
        [NOS_SYM, "search", "--run-dir", str(run_dir), "--space", "small", "--dataset",
         "synthetic", "--protocol", "quick", "--backend", "inline", "--budget", "6"],
        check=True, capture_output=True,
    )  # fmt: skip
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = tiny_run(Path(tmp))
        old_dir = Path(tmp) / "old"  # as written before checkpoint.json existed
        shutil.copytree(run_dir, old_dir)
        (old_dir / "checkpoint.json").unlink()
        commands = {
            "`python -c pass` (reference)": [python, "-c", "pass"],
            "`python -c 'import torch'` (reference)": [python, "-c", "import torch"],
            "`nos-sym parse RULE`": [NOS_SYM, "parse", RULE],
            "`nos-sym tree RULE -o t.dot`": [NOS_SYM, "tree", RULE, "-o", f"{tmp}/t.dot"],
            "`nos-sym top RUN`": [NOS_SYM, "top", str(run_dir)],
            "`nos-sym status RUN`": [NOS_SYM, "status", str(run_dir)],
            "`nos-sym status OLD_RUN` (no `checkpoint.json`)": [NOS_SYM, "status", str(old_dir)],
            "search worker start-up (import the evaluator and backends)": [
                python,
                "-c",
                "import nos_sym.controller.backends, nos_sym.evaluation.evaluator",
            ],  # fmt: skip
        }
        rows = [
            f"| {name} | {seconds(command, args.repeats):.2f} |"
            for name, command in commands.items()
        ]
    body = "\n".join(
        [
            f"Median of {args.repeats} fresh processes each (target: the four commands ≤ 0.8 s).",
            "",
            "| command | seconds |",
            "| --- | --- |",
            *rows,
        ]
    )
    write_section("bench_startup", body)


if __name__ == "__main__":
    main()
