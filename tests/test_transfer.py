"""``nos-sym transfer`` on a tiny deterministic FunctionTask: the tables parse, the JSON has every
seed, a rerun trains nothing, bad input exits 2 before training, and --workers 2 agrees with 1."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nos_sym.cli import main
from nos_sym.evaluation.outcome import EvalResult
from nos_sym.evaluation.protocol import Protocol
from nos_sym.tasks import FunctionTask, TaskRun
from nos_sym.tasks.transfer import (
    Contender,
    contenders,
    latex_escape,
    latex_table,
    markdown_table,
    row,
)

CALLS: list[tuple[float, int]] = []


def quadratic(make_optimizer, lr: float, seed: int, steps: int) -> TaskRun:
    """−log10 of ½‖w‖² along ``steps`` steps from a seeded start; seed 7 diverges (NaN)."""
    CALLS.append((lr, seed))
    weights = torch.randn(8, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    optimizer = make_optimizer([weights])
    curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * weights.pow(2).sum()).backward()
        optimizer.step()
        curve.append(-math.log10(0.5 * float(weights.detach().pow(2).sum()) + 1e-30))
    metric = math.nan if seed == 7 else curve[-1]
    return TaskRun(metric=metric, curve=tuple(curve), test=curve[-1] - 0.5)


TINY = Protocol(
    name="tiny-transfer",
    learning_rates=(1e-2, 1e-1),
    sweep_examples=10,
    final_examples=20,
    final_epochs=1,
    batch_size=1,
    n_valid=1,
)
TASK = FunctionTask(
    "quadratic-transfer", 1, quadratic, protocols={"tiny": TINY}, default_protocol="tiny"
)
"""The task of these tests, importable by the CLI (and spawned workers) as ``MODULE:TASK``."""
RULES = ("powersign", "m v id sqrt div")
BASELINES = ("sgd", "adam")


def transfer(output: Path, *extra: str, seeds: tuple[int, ...] = (0, 1)) -> int:
    return main(
        [
            "transfer",
            "--task",
            f"{__name__}:TASK",
            "--baselines",
            *BASELINES,
            "--rules",
            *RULES,
            "--seeds",
            *map(str, seeds),
            "-o",
            str(output),
            *extra,
        ]
    )


def cells(line: str) -> list[str]:
    """The cells of a Markdown table line (an escaped ``\\|`` is not a separator)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("transfer") / "out"
    CALLS.clear()
    assert transfer(output) == 0
    assert CALLS  # it trained
    return output


def test_markdown_table_parses(first_run: Path) -> None:
    header, rule, *rows = table_lines((first_run / "transfer.md").read_text())
    assert cells(header)[:4] == ["optimizer", "final validation", "best validation", "test"]
    assert all(set(cell) <= {"-"} for cell in cells(rule))
    assert all(len(cells(line)) == len(cells(header)) for line in (rule, *rows))
    assert [cells(line)[0].strip("*`") for line in rows] == [*BASELINES, *RULES]
    assert all(cells(line)[-1] == "2/2" for line in rows)
    text = (first_run / "transfer.md").read_text()
    assert f"{__name__}:TASK" in text and TASK.identity in text and "seeds: 0, 1" in text


def test_latex_table_is_booktabs(first_run: Path) -> None:
    lines = (first_run / "transfer.tex").read_text().splitlines()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in lines
    body = lines[lines.index(r"\midrule") + 1 : lines.index(r"\bottomrule")]
    rows = [line for line in body if line != r"\midrule"]
    assert len(rows) == len(BASELINES) + len(RULES)
    assert all(line.count("&") == 5 and line.endswith(r"\\") for line in rows)


def test_json_has_every_seed(first_run: Path) -> None:
    summary = json.loads((first_run / "transfer.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert [o["name"] for o in summary["optimizers"]] == [*BASELINES, *RULES]
    for optimizer in summary["optimizers"]:
        assert [s["seed"] for s in optimizer["seeds"]] == [0, 1]
        for seed in optimizer["seeds"]:
            assert seed["status"] == "ok" and seed["best_lr"] in TINY.learning_rates
            assert seed["best_validation"] == max(seed["curve"]) >= seed["final_validation"]
            assert seed["test"] == pytest.approx(seed["curve"][-1] - 0.5)
    assert (first_run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_trains_nothing(first_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (first_run / "transfer.md").read_text()
    CALLS.clear()
    assert transfer(first_run) == 0
    assert CALLS == []
    assert "0 trained, 8 from the store" in capsys.readouterr().out
    assert table_lines((first_run / "transfer.md").read_text()) == table_lines(before)
    assert json.loads((first_run / "transfer.json").read_text())["trained"] == 0


def test_a_diverged_seed_counts_as_zero_and_is_flagged(tmp_path: Path) -> None:
    assert transfer(tmp_path, seeds=(0, 7)) == 0
    rows = table_lines((tmp_path / "transfer.md").read_text())[2:]
    assert all(cells(line)[-1] == "1/2 (seed 7: diverged)" for line in rows)
    seeds = json.loads((tmp_path / "transfer.json").read_text())["optimizers"][0]["seeds"]
    assert seeds[1]["final_validation"] == 0.0 and seeds[1]["status"] == "diverged"


def test_a_degenerate_rule_is_flagged_with_test_zero(tmp_path: Path) -> None:
    assert transfer(tmp_path, "--rules", "powersign", "one one id id add", "--baselines") == 0
    powersign, degenerate = table_lines((tmp_path / "transfer.md").read_text())[2:]
    assert cells(powersign)[-1] == "2/2"
    assert cells(degenerate)[1:4] == ["0.0000 ± 0.0000"] * 3
    assert cells(degenerate)[-1] == "0/2 (seed 0: degenerate; seed 1: degenerate)"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rules", "sgd", "not a rule"], "not a rule"),
        (["--baselines", "lion"], "unknown baseline 'lion'"),
        (["--lrs", "-1"], "--lrs"),
        (["--seeds", "0", "0"], "a seed twice"),
        (["--workers", "0"], "--workers"),
        (["--protocol", "nope"], "unknown protocol"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["-o", "{file}/out"], "cannot create"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (tmp_path / "file").write_text("")
    CALLS.clear()
    code = transfer(tmp_path / "out", *[arg.format(file=tmp_path / "file") for arg in extra])
    err = capsys.readouterr().err
    assert code == 2 and CALLS == []
    assert err.startswith("nos-sym: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_workers_give_the_same_numbers(tmp_path: Path) -> None:
    assert transfer(tmp_path / "one") == 0
    assert transfer(tmp_path / "two", "--workers", "2") == 0

    def numbers(directory: Path) -> list:
        summary = json.loads((directory / "transfer.json").read_text())
        return [
            [{k: s[k] for k in s if k != "seconds"} for s in optimizer["seeds"]]
            for optimizer in summary["optimizers"]
        ]

    assert numbers(tmp_path / "one") == numbers(tmp_path / "two")


def test_contenders_list_each_rule_once() -> None:
    listed = contenders(["powersign", "sign_g sign_m id id mul ; o1 g exp id mul", "sgd"], ["sgd"])
    assert [(c.name, c.baseline) for c in listed] == [
        ("sgd", True),
        ("powersign", False),
        ("sgd", False),  # the DSL rule sgd, not the torch.optim baseline
    ]


def _result(status: str, reward: float, curve: tuple[float, ...] = ()) -> EvalResult:
    return EvalResult(dsl="g", key="g", status=status, reward=reward, best_lr=0.1, curve=curve)


def test_row_statistics_and_escaping() -> None:
    item = row(
        Contender("a_b & c", False, "g", "g"),
        [0, 1, 2],
        [
            _result("ok", 0.5, (0.2, 0.7, 0.5)),
            _result("ok", 0.7),
            _result("failed", 0.0),
        ],
    )
    assert item.final == (0.5, 0.7, 0.0) and item.best == (0.7, 0.7, 0.0)
    assert item.test is None and item.ok == 2 and item.flags == ("seed 2: failed",)
    assert "| 0.4000 ± 0.3606 |" in markdown_table([item], 3)  # sample std, ddof = 1
    assert r"a\_b \& c &" in latex_table([item], 3)
    assert latex_escape("x^2 ~ 50% $#{}\\") == (
        r"x\textasciicircum{}2 \textasciitilde{} 50\% \$\#\{\}\textbackslash{}"
    )
