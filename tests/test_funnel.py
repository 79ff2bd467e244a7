"""The successive-halving funnel of a search (--rungs): promotion, per-rung accounting, the
budget in last-rung units, final seeds, resume, old run directories, bad options."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import statistics
from pathlib import Path

import pytest
import torch
from test_tasks import quadratic  # module level: picklable for worker processes

import nos_sym.controller.backends as backends
import nos_sym.controller.search as search_module
from nos_sym.cli import main
from nos_sym.controller.funnel import Funnel, Rung, rung_cost
from nos_sym.controller.rundir import load_checkpoint, load_config, read_log
from nos_sym.controller.search import (
    InlineBackend,
    SearchConfig,
    SearchError,
    SearchRun,
    leaderboard,
    read_samples,
    status,
)
from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.protocol import PROTOCOLS, Protocol
from nos_sym.evaluation.store import RewardStore
from nos_sym.tasks.base import FunctionTask

RUNGS = ("quick", "screen", "paper")
FUNNEL = {
    "space": "small",
    "dataset": "synthetic",
    "backend": "inline",
    "algo": "random",
    "batch": 5,
    "seed": 0,
    "rungs": RUNGS,
    "promote": 0.3,
    "final_seeds": 2,
}


def config(**overrides) -> SearchConfig:
    return SearchConfig(**{**FUNNEL, "budget": 4, **overrides})


def _unit(*parts: object) -> float:
    text = "/".join(map(str, parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:6], 16) / 0xFFFFFF


class FakeBackend:
    """Instant evaluations: a reward made from the rule's key (its quality) and the protocol and
    seed (noise); every 9th rule diverges. Synchronous, so as deterministic as inline."""

    def __init__(self):
        self.jobs = []

    def submit(self, jobs):
        self.jobs.extend(jobs)
        done = []
        for job in jobs:
            future = concurrent.futures.Future()
            if int(job.key[:6], 16) % 9 == 0:
                result = EvalResult(dsl=job.dsl, key=job.key, status="diverged", reward=0.0)
            else:
                reward = 0.7 * _unit(job.key) + 0.3 * _unit(job.key, job.protocol, job.seed)
                result = EvalResult(
                    dsl=job.dsl, key=job.key, status="ok", reward=reward, seconds=0.25
                )
            future.set_result(result)
            done.append(future)
        return done

    def close(self):
        pass


def _promotion_lines(run_dir: Path) -> list[dict]:
    return [line for line in read_log(run_dir)[0] if "rung" in line]


# --- the promotion rule ---------------------------------------------------------------------


def _line(key: str, reward: float, status: str = "ok", outcome: str = "evaluated") -> dict:
    return {"key": key, "dsl": key, "reward": reward, "status": status, "outcome": outcome}


RULE_CASES = [
    # (promote, [(key, reward, status)], promoted after each line)
    (0.5, [("a", 0.1), ("b", 0.9), ("c", 0.5), ("d", 0.7)], [[], ["b"], [], ["d"]]),
    # the best of the first 10 is promoted at the 10th result, however early it came
    (0.1, [("k0", 0.9)] + [(f"k{i}", 0.1 * i / 10) for i in range(1, 10)], [[]] * 9 + [["k0"]]),
    # ties: by key
    (0.5, [("z", 0.5), ("y", 0.5)], [[], ["y"]]),
    # a failed or diverged candidate is never promoted, whatever its place
    (1.0, [("a", 0.0, "failed"), ("b", 0.3)], [[], ["b"]]),
    # a duplicate sample is one candidate
    (0.5, [("a", 0.2), ("a", 0.2), ("b", 0.1)], [[], [], ["a"]]),
    (1.0, [("a", 0.2), ("d", 0.0, "degenerate", "degenerate")], [["a"], []]),
]


@pytest.mark.parametrize(("promote", "results", "expected"), RULE_CASES)
def test_promotion_picks_the_top_fraction_of_the_finished(promote, results, expected):
    rungs = [Rung(0, "lo", "h0", 10, (0,)), Rung(1, "hi", "h1", 50, (0,))]
    funnel = Funnel(rungs, promote)
    decided = [[p.key for p in funnel.fold(_line(*result))] for result in results]
    assert decided == expected
    assert list(funnel.pending) == [(1, key) for keys in expected for key in keys]


def _decisions(lines: list[dict], promote: float, last: int) -> list[tuple[int, str]]:
    """The promotions the rule decides over a log, by brute force."""
    finished: dict[int, dict[str, dict]] = collections.defaultdict(dict)
    decided: list[tuple[int, str]] = []
    for line in lines:
        rung = line.get("rung", 0)
        if line["outcome"] == "degenerate" or line["key"] in finished[rung]:
            continue
        finished[rung][line["key"]] = line
        if rung == last:
            continue
        ranked = sorted(finished[rung].values(), key=lambda x: (-x["reward"], x["key"]))
        for best in ranked[: int(len(ranked) * promote + 1e-9)]:
            if best["status"] == "ok" and (rung + 1, best["key"]) not in decided:
                decided.append((rung + 1, best["key"]))
    return decided


def test_a_whole_run_promotes_by_the_rule(tmp_path):
    run_dir = tmp_path / "run"
    SearchRun(run_dir, config(budget=6)).run(backend=FakeBackend())
    decided = _decisions(read_log(run_dir)[0], 0.3, 2)
    logged = [(line["rung"], line["key"]) for line in _promotion_lines(run_dir)]
    # a synchronous backend finishes promotions in the order they were decided; the rest wait
    assert logged == decided[: len(logged)] and any(rung == 2 for rung, _ in logged)
    assert sum(row.get("pending", 0) for row in status(run_dir)["rungs"]) == len(decided) - len(
        logged
    )


# --- accounting and budget ------------------------------------------------------------------


def test_per_rung_accounting_and_the_budget_in_last_rung_units(tmp_path):
    run_dir, backend = tmp_path / "run", FakeBackend()
    run = SearchRun(run_dir, config(budget=6))
    costs = {rung.protocol: rung.cost for rung in run.rungs}
    counters = run.run(backend=backend)
    summary = status(run_dir)
    # rung 0: every sample is evaluated, from the store or degenerate
    assert summary["samples"] == counters.samples == len(read_samples(run_dir))
    assert (
        summary["samples"] == summary["evaluated"] + summary["from_store"] + summary["degenerate"]
    )
    rungs = summary["rungs"]
    assert [row["protocol"] for row in rungs] == list(RUNGS)
    assert [row["cost"] for row in rungs] == [rung_cost(run.task, PROTOCOLS[p]) for p in RUNGS]
    for row in rungs[1:]:
        assert row["promoted"] == row["evaluated"] + row["from_store"] + row["pending"]
        assert row["evaluated"] > 0
    assert rungs[2]["seeds"] == 2
    # what the backend trained is what the accounting charged
    trained = collections.Counter(job.protocol for job in backend.jobs)
    assert trained["quick"] == summary["evaluated"]
    assert trained["screen"] == rungs[1]["evaluated"]
    assert trained["paper"] == 2 * rungs[2]["evaluated"]
    steps = sum(costs[job.protocol] for job in backend.jobs)
    assert summary["compute"] == pytest.approx(steps / costs["paper"]) == run.compute
    # the budget: never exceeded, and stopped because the next evaluation did not fit
    # (a blocked promotion to the last rung costs at most final_seeds last-rung evaluations)
    assert summary["budget"] == 6 and summary["compute"] <= 6
    assert 6 - summary["compute"] < 2
    # every rung's rewards are in the store under its own protocol hash
    with RewardStore(run_dir / "store.sqlite") as store:
        for rung in run.rungs:
            for line in _promotion_lines(run_dir):
                if line["rung"] == rung.index:
                    for seed in rung.seeds:
                        record = store.get(line["key"], rung.hash, run.task.identity, seed)
                        assert record is not None and record.result.status == line["status"]


def test_a_run_without_rungs_spends_its_budget_as_before(tmp_path):
    # one rung: every unit is one evaluation, the log has no promotion lines, status no rungs
    run_dir = tmp_path / "run"
    counters = SearchRun(run_dir, config(rungs=None, final_seeds=1, promote=0.1, budget=7)).run(
        backend=FakeBackend()
    )
    assert counters.evaluated == 7
    assert not _promotion_lines(run_dir) and "rungs" not in status(run_dir)
    assert not (run_dir / "funnel.json").exists()
    assert set(leaderboard(run_dir)[0]) == {
        "dsl",
        "minimal_dsl",
        "key",
        "reward",
        "status",
        "latex",
    }


def test_final_seeds_give_mean_and_std_and_the_leaderboard_ranks_by_rung(tmp_path):
    run_dir = tmp_path / "run"
    SearchRun(run_dir, config(budget=8, final_seeds=3, eval_seed=5)).run(backend=FakeBackend())
    last = [line for line in _promotion_lines(run_dir) if line["rung"] == 2]
    assert last
    for line in last:
        assert line["seeds"] == [5, 6, 7] and len(line["rewards"]) == 3
        assert line["reward"] == pytest.approx(statistics.fmean(line["rewards"]))
    rows = leaderboard(run_dir, 100)
    assert [row["rung"] for row in rows] == sorted((row["rung"] for row in rows), reverse=True)
    for rung in {row["rung"] for row in rows}:
        rewards = [row["reward"] for row in rows if row["rung"] == rung]
        assert rewards == sorted(rewards, reverse=True)
    top = rows[0]
    line = next(line for line in last if line["key"] == top["key"])
    assert top["protocol"] == "paper" and top["seeds"] == [5, 6, 7]
    assert top["std"] == pytest.approx(statistics.pstdev(line["rewards"]))
    assert rows[-1]["protocol"] == "quick" and rows[-1]["seeds"] == [5]
    assert len({row["key"] for row in rows}) == len(rows)  # one row per rule


def test_promotions_are_answered_from_a_shared_store(tmp_path):
    store = str(tmp_path / "shared.sqlite")
    SearchRun(tmp_path / "a", config(store=store)).run(backend=FakeBackend())
    first = {(line["rung"], line["key"]) for line in _promotion_lines(tmp_path / "a")}
    backend = FakeBackend()
    SearchRun(tmp_path / "b", config(store=store, max_samples=40)).run(backend=backend)
    again = [
        line for line in _promotion_lines(tmp_path / "b") if (line["rung"], line["key"]) in first
    ]
    assert again and all(line["outcome"] == "from_store" and line["paid"] == 0 for line in again)
    assert not {(job.key, job.protocol) for job in backend.jobs} & {
        (key, RUNGS[rung]) for rung, key in first
    }


def test_numeric_dedup_makes_fingerprint_twins_one_candidate(tmp_path):
    run_dir = tmp_path / "run"
    SearchRun(run_dir, config(dedup="numeric", budget=6)).run(backend=FakeBackend())
    promoted = [(line["rung"], line["fingerprint"]) for line in _promotion_lines(run_dir)]
    assert promoted and len(promoted) == len(set(promoted))
    decided = _decisions(
        [
            {**line, "key": line["fingerprint"]}
            for line in read_log(run_dir)[0]
            if "fingerprint" in line
        ],
        0.3,
        2,
    )
    assert promoted == decided[: len(promoted)]


# --- resume ---------------------------------------------------------------------------------


def _tiny(name: str, rates: int, examples: int) -> Protocol:
    return Protocol(name=name, learning_rates=(1e-3, 1e-2, 1e-1)[-rates:],
                    sweep_examples=examples, final_epochs=1, final_examples=2 * examples,
                    batch_size=1, n_valid=1)  # fmt: skip


TINY = {"t0": _tiny("t0", 2, 4), "t1": _tiny("t1", 3, 10), "t2": _tiny("t2", 3, 20)}
BOWL = FunctionTask("bowl", 1, quadratic, protocols=TINY)
"""A task that trains in milliseconds (``--task test_funnel:BOWL``); rungs t0, t1, t2 cost
2·4 + 8 = 16, 3·10 + 20 = 50 and 3·20 + 40 = 100 steps."""


class Interrupt(BaseException):
    """A crash in the middle of a run (not an Exception: nothing catches it)."""


def _unmeasured(lines: list[dict]) -> list[dict]:
    """Lines (or status summaries) without measured seconds, which vary from run to run."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(lines)


def _parameters(run_dir: Path) -> list[torch.Tensor]:
    def flatten(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from flatten(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from flatten(item)

    return list(flatten(load_checkpoint(run_dir)["algorithm"]))


@pytest.mark.parametrize(("algo", "where"), [("trpo", "evaluation"), ("evolution", "checkpoint")])
def test_a_resumed_run_makes_the_same_funnel_decisions_on_inline(
    tmp_path, monkeypatch, algo, where
):
    options = {"rungs": tuple(TINY), "algo": algo, "budget": 10, "batch": 3, "promote": 0.34}
    options |= {"task": BOWL.identity}
    if algo == "evolution":
        options |= {"population": 4, "tournament": 2}
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    SearchRun(reference, config(**options), BOWL).run(backend=InlineBackend())

    calls = collections.Counter()
    if where == "evaluation":  # the 12th training raises: mid-step, claims held
        evaluate = backends.evaluate_job

        def crashing(job):
            calls["jobs"] += 1
            if calls["jobs"] == 12:
                raise Interrupt
            return evaluate(job)

        monkeypatch.setattr(backends, "evaluate_job", crashing)
    else:  # the 4th checkpoint is never written: the step's lines are logged, then cut back
        write = search_module.atomic_write

        def crashing(path, writer):
            calls[path.name] += 1
            if path.name == "checkpoint.pt" and calls[path.name] == 4:
                raise Interrupt
            write(path, writer)

        monkeypatch.setattr(search_module, "atomic_write", crashing)
    with pytest.raises(Interrupt):
        SearchRun(crashed, config(**options), BOWL).run(backend=InlineBackend())
    monkeypatch.undo()
    assert len(read_log(crashed)[0]) < len(read_log(reference)[0])
    SearchRun(crashed, config(**options), BOWL).run(backend=InlineBackend())

    decisions = [(line["rung"], line["key"], line["outcome"]) for line in _promotion_lines(crashed)]
    expected = [
        (line["rung"], line["key"], line["outcome"]) for line in _promotion_lines(reference)
    ]
    assert decisions == expected and any(rung == 2 for rung, _, _ in expected)
    assert _unmeasured(read_log(crashed)[0]) == _unmeasured(read_log(reference)[0])
    assert _unmeasured([status(crashed)]) == _unmeasured([status(reference)])
    assert leaderboard(crashed, 50) == leaderboard(reference, 50)
    for expected_tensor, actual in zip(_parameters(reference), _parameters(crashed), strict=True):
        assert torch.equal(expected_tensor, actual)


def test_a_funnel_on_the_process_backend(tmp_path):
    run_dir = tmp_path / "run"
    options = {"rungs": tuple(TINY), "task": BOWL.identity, "budget": 6, "promote": 0.5}
    run = SearchRun(run_dir, config(**options, backend="process", workers=2), BOWL)
    run.run()
    summary = status(run_dir)
    assert (
        summary["samples"] == summary["evaluated"] + summary["from_store"] + summary["degenerate"]
    )
    for row in summary["rungs"][1:]:
        assert row["promoted"] == row["evaluated"] + row["from_store"] + row["pending"]
    assert summary["rungs"][1]["evaluated"] > 0 and 0 < summary["compute"] <= 6


# --- run directories and options -------------------------------------------------------------


def test_an_old_run_directory_without_rung_fields_loads_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    SearchRun(run_dir, config(rungs=None, final_seeds=1, promote=0.1, budget=3)).run(
        backend=FakeBackend()
    )
    saved = json.loads((run_dir / "config.json").read_text())
    for name in ("rungs", "promote", "final_seeds"):
        del saved[name]  # as the code before the funnel wrote it
    (run_dir / "config.json").write_text(json.dumps(saved))
    loaded, _ = load_config(run_dir)
    assert (loaded.rungs, loaded.promote, loaded.final_seeds) == (None, 0.1, 1)
    assert status(run_dir)["evaluated"] == 3 and "rungs" not in status(run_dir)
    counters = SearchRun(run_dir, config(rungs=None, final_seeds=1, promote=0.1, budget=5)).run(
        backend=FakeBackend()
    )
    assert counters.evaluated == 5


def test_rungs_round_trip_through_config_json(tmp_path):
    run_dir = tmp_path / "run"
    SearchRun(run_dir, config(budget=0)).run(backend=FakeBackend())
    assert json.loads((run_dir / "config.json").read_text())["rungs"] == list(RUNGS)
    assert load_config(run_dir)[0].rungs == RUNGS
    with pytest.raises(SearchError, match="promote: 0.3 → 0.5"):
        SearchRun(run_dir, config(budget=0, promote=0.5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rungs", "quick,nope"], "--rungs: unknown protocol 'nope'"),
        (["--rungs", "quick,quick"], "--rungs must be distinct protocol names"),
        (["--rungs", "quick,"], "--rungs must be distinct protocol names"),
        (["--rungs", "quick,paper", "--promote", "0"], "--promote must be in (0, 1]"),
        (["--rungs", "quick,paper", "--promote", "1.5"], "--promote must be in (0, 1]"),
        (["--rungs", "quick,paper", "--final-seeds", "0"], "--final-seeds must be at least 1"),
        (["--final-seeds", "3"], "--final-seeds needs two --rungs or more"),
    ],
)
def test_bad_funnel_options_are_one_line_errors(tmp_path, capsys, options, message):
    run_dir = tmp_path / "run"
    argv = ["search", "--run-dir", str(run_dir), "--dataset", "synthetic", "--backend", "inline"]
    assert main([*argv, *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run_dir.exists()


def test_cli_search_top_status_with_rungs(tmp_path, capsys):
    t0, t1 = "t0", "t1"
    run_dir = str(tmp_path / "run")
    argv = ["search", "--run-dir", run_dir, "--space", "small", "--task", "test_funnel:BOWL",
            "--backend", "inline", "--algo", "random", "--batch", "4", "--budget", "6",
            "--rungs", f"{t0},{t1}", "--promote", "0.5", "--final-seeds", "2"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["top", run_dir, "-n", "50"]) == 0
    text = capsys.readouterr().out
    assert f"1:{t1}" in text and f"0:{t0}" in text
    assert main(["top", run_dir, "--format", "markdown"]) == 0
    assert f"(1: {t1}, 2 seeds) | ok |" in capsys.readouterr().out
    assert main(["status", run_dir]) == 0
    text = capsys.readouterr().out
    assert "rung 1: protocol t1" in text and "compute" in text
    report = tmp_path / "report.png"
    assert main(["report", run_dir, "-o", str(report), "--html", str(tmp_path / "r.html")]) == 0
    assert "| rung 1 | protocol t1, seeds 2," in report.with_suffix(".md").read_text()
    assert "(1: t1, 2 seeds)" in (tmp_path / "r.html").read_text()
    summary = status(run_dir)
    assert 0 < summary["compute"] <= 6
    assert json.loads((Path(run_dir) / "funnel.json").read_text())["rungs"][1]["seeds"] == [0, 1]
