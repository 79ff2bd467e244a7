"""``nos-sym top`` and ``status``: a run's leaderboard and counts. Its imports are light (no
torch, no matplotlib), so both answer at once; the other run commands are in
:mod:`~nos_sym.controller.commands`."""

from __future__ import annotations

import argparse
import json

from nos_sym.controller.rundir import (
    leaderboard,
    leaderboard_markdown,
    load_config,
    status,
    status_rows,
)


def print_top(run_dir: str, n: int, fmt: str) -> None:
    """Print the first ``n`` rows of the run's leaderboard as text, JSON, LaTeX or Markdown."""
    rows = leaderboard(run_dir, n)
    if fmt == "json":
        print(json.dumps(rows))
    elif fmt == "latex":
        for row in rows:
            print(f"{row['reward']:.4f} & \\texttt{{{row['minimal_dsl']}}} & ${row['latex']}$ \\\\")
    elif fmt == "markdown":
        print(leaderboard_markdown(rows))
    else:
        # a --rungs run: each row's protocol (its highest rung), mean ± std over n seeds
        funnel = any("protocol" in row for row in rows)
        print(f"{'#':>3}  {'reward':>7}  " + "± std    seeds  rung:protocol  " * funnel, end="")
        print(f"{'status':<9}  rule (minimal form)")
        for i, row in enumerate(rows, start=1):
            where = ""
            if funnel:
                rung = f"{row['rung']}:{row['protocol']}"
                where = f"± {row['std']:.4f}  {len(row['seeds']):>5}  {rung:<13}  "
            print(
                f"{i:>3}  {row['reward']:7.4f}  {where}{row['status']:<9}  {row['minimal_dsl']}  "
                f"[{row['key'][:10]}]  {row['latex']}"
            )


def _top_command(args: argparse.Namespace) -> None:
    load_config(args.run_dir)
    print_top(args.run_dir, args.n, args.format)


def _status_command(args: argparse.Namespace) -> None:
    summary = status(args.run_dir)
    if args.format == "json":
        print(json.dumps(summary))
        return
    for name, value in status_rows(summary):
        print(f"{name:>16}: {value}")


def add_top(command: argparse.ArgumentParser) -> None:
    command.add_argument("run_dir")
    command.add_argument("-n", type=int, default=10)
    command.add_argument("--format", choices=("text", "json", "latex", "markdown"), default="text")
    command.set_defaults(run=_top_command)


def add_status(command: argparse.ArgumentParser) -> None:
    command.add_argument("run_dir")
    command.add_argument("--format", choices=("text", "json"), default="text")
    command.set_defaults(run=_status_command)
