"""``nos-sym study``: per-arm charging on a shared store, the study end to end on a toy reward,
resume, bad options."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3

import pytest
from test_funnel import FUNNEL, FakeBackend
from test_search import InstantBackend, config
from test_tasks import TINY, quadratic

from nos_sym.cli import main
from nos_sym.controller.search import SearchRun, read_samples, status
from nos_sym.controller.study import STUDY_BASELINES
from nos_sym.tasks.base import FunctionTask


def _accounting(run_dir) -> dict:
    """The run's counts, checked: every sample one outcome, no key paid for twice, a charged
    sample is from_store and charged once per key."""
    summary, lines = status(run_dir), read_samples(run_dir)
    assert summary["samples"] == len(lines)
    outcomes = summary["evaluated"] + summary["from_store"] + summary["degenerate"]
    assert summary["samples"] == outcomes
    evaluated = [line["key"] for line in lines if line["outcome"] == "evaluated"]
    charged = [line["key"] for line in lines if line.get("charged")]
    assert len(evaluated) == len(set(evaluated)) and len(charged) == len(set(charged))
    assert all(line["outcome"] == "from_store" for line in lines if line.get("charged"))
    assert not set(evaluated) & set(charged)
    return summary


@pytest.mark.parametrize("charge", [False, True])
def test_two_arms_on_a_shared_store_are_each_charged(tmp_path, charge):
    store = str(tmp_path / "shared.sqlite")
    first, second = InstantBackend(), InstantBackend()
    options = {"algo": "random", "budget": 8, "batch": 3, "max_samples": 60}
    SearchRun(tmp_path / "a", config(store=store, charge_store_hits=True, **options)).run(
        backend=first
    )
    run = SearchRun(tmp_path / "b", config(store=store, charge_store_hits=charge, **options))
    counters = run.run(backend=second)
    a, b = _accounting(tmp_path / "a"), _accounting(tmp_path / "b")
    assert a["evaluated"] == 8 and a["charged"] == 0
    # the same seed samples the same keys: the second arm trains none of a's keys again
    trained = [job.key for job in second.jobs]
    assert not set(trained) & {job.key for job in first.jobs}
    lines = read_samples(tmp_path / "b")
    charged = [line for line in lines if line.get("charged")]
    if charge:
        # each arm pays its budget as if it were alone: the same samples as a
        assert b["charged"] == counters.charged == 8 and b["evaluated"] == 0
        assert [line["key"] for line in lines] == [
            line["key"] for line in read_samples(tmp_path / "a")
        ]
    else:  # free answers: it goes on sampling and pays for 8 keys of its own
        assert "charged" not in b and not charged and b["evaluated"] == 8


def test_charging_in_a_funnel_counts_in_each_rungs_cost(tmp_path):
    store = str(tmp_path / "shared.sqlite")
    funnel = {**FUNNEL, "store": store, "charge_store_hits": True, "budget": 4}
    runs = {}
    for name in ("a", "b"):
        backend = FakeBackend()
        SearchRun(tmp_path / name, config(**funnel)).run(backend=backend)
        runs[name] = (status(tmp_path / name), backend.jobs)
    (a, a_jobs), (b, b_jobs) = runs["a"], runs["b"]
    assert a_jobs and not b_jobs  # b trains nothing: every answer is a's
    assert a["compute"] == b["compute"] <= 4
    for rung_a, rung_b in zip(a["rungs"], b["rungs"], strict=True):
        assert rung_a["finished"] == rung_b["finished"]
        assert (
            rung_b.get("charged", 0)
            == rung_a["finished"] * rung_a["seeds"] * (rung_a["rung"] > 0)
            + (rung_a["rung"] == 0) * a["evaluated"]
        )
    _accounting(tmp_path / "b")


# --- the study end to end on a toy reward ---------------------------------------------------
TOY = FunctionTask(
    "toy",
    1,
    quadratic,
    protocols={
        "tiny": TINY,  # 3 · 10 + 20 = 50 steps
        "tiny-final": dataclasses.replace(
            TINY, name="tiny-final", sweep_examples=40, final_examples=80
        ),  # 3 · 40 + 80 = 200 steps
    },
)
"""The study's task, importable as ``test_study:TOY``: two tiny protocols on a quadratic."""
STUDY = [
    "--task", "test_study:TOY", "--space", "small", "--algos", "trpo,random", "--seeds", "0", "1",
    "--budget", "3", "--rungs", "tiny,tiny-final", "--promote", "0.5",
    "--final-protocol", "tiny-final", "--final-seeds-eval", "2",
]  # fmt: skip


def _store_rows(path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM rewards").fetchone()[0]


def test_study_end_to_end_and_its_resume_pays_nothing(tmp_path, capsys):
    root = tmp_path / "study"
    assert main(["study", "--run-dir", str(root), *STUDY]) == 0
    for name in ("study.md", "study.json", "best_so_far.png"):
        assert (root / name).stat().st_size > 0
    result = json.loads((root / "study.json").read_text())
    arms = [arm["arm"] for arm in result["arms"]]
    assert arms == ["trpo-0", "trpo-1", "random-0", "random-1"]
    for arm in result["arms"]:
        counts = arm["counts"]
        assert (
            counts["samples"] == counts["evaluated"] + counts["from_store"] + counts["degenerate"]
        )
        assert arm["compute"] <= 3 and arm["saved"] == counts["from_store"] + counts["degenerate"]
        assert len(arm["final"]["rewards"]) == 2
        compute = [x for x, _ in arm["curve"]]
        assert compute == sorted(compute) and compute[-1] <= 3  # rung 1 reached: a curve
    assert [row["optimizer"] for row in result["baselines"]] == list(STUDY_BASELINES)
    trpo = next(row for row in result["algorithms"] if row["algo"] == "trpo")
    assert (trpo["test"]["n"], trpo["test"]["m"]) == (2, 2)
    assert trpo["test"]["min_p"] == pytest.approx(1 / 6) and 0 < trpo["test"]["p"] <= 1
    text = (root / "study.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| trpo-0 |")]
    assert len(table) == 2  # the final table and the dedup table
    final_row = table[0].split(" | ")
    mean, std = (float(part) for part in final_row[3].split(" ± "))
    assert mean == pytest.approx(result["arms"][0]["final"]["mean"], abs=1e-4)
    assert f"nos-sym study --run-dir {root}" in text and "min p" in text
    # the rerun resumes every arm and recomputes the report, paying nothing
    logs = {arm: (root / "arms" / arm / "samples.jsonl").read_text() for arm in arms}
    rows = _store_rows(root / "store.sqlite")
    assert main(["study", "--run-dir", str(root), *STUDY]) == 0
    assert {arm: (root / "arms" / arm / "samples.jsonl").read_text() for arm in arms} == logs
    assert _store_rows(root / "store.sqlite") == rows
    again = json.loads((root / "study.json").read_text())
    assert len(again["invocations"]) == 2 and again["arms"] == result["arms"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--algos", "trpo,bogus", "--algos must be among"),
        ("--algos", "trpo,trpo", "--algos has a name twice"),
        ("--budget", "0", "--budget must be at least 1"),
        ("--final-protocol", "nope", "--final-protocol: unknown protocol 'nope'"),
        ("--rungs", "tiny,nope", "--rungs: unknown protocol 'nope'"),
        ("--workers", "0", "--workers must be at least 1"),
        ("--final-seeds-eval", "0", "--final-seeds-eval must be at least 1"),
        ("--space", "huge", "--space must be one of"),
        ("--task", "no_such_module:TASK", "no_such_module"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, option, value, message):
    root = tmp_path / "study"
    options = [*STUDY]
    if option in options:
        options[options.index(option) + 1] = value
    else:
        options += [option, value]
    assert main(["study", "--run-dir", str(root), *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("nos-sym: error:") and "\n" not in error and message in error
    assert not root.exists()


def test_a_seed_twice_is_refused(tmp_path, capsys):
    root = tmp_path / "study"
    options = [*STUDY]
    options[options.index("--seeds") + 1 : options.index("--seeds") + 3] = ["0", "0"]
    assert main(["study", "--run-dir", str(root), *options]) == 2
    assert "--seeds has a seed twice" in capsys.readouterr().err
    assert not root.exists()
