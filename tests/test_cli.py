"""The real ``nos-sym`` command, run in a subprocess."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

NOS_SYM = str(Path(sys.executable).with_name("nos-sym"))


def nos_sym(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NOS_SYM, *args], capture_output=True, text=True, timeout=120)


def test_parse_json():
    done = nos_sym("parse", "v g sqrt id keep ; m o1 id id div", "--format", "json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert set(summary) == {"dsl", "minimal_dsl", "key", "latex", "sympy", "degenerate"}
    assert summary["dsl"] == "v g sqrt id keep ; m o1 id id div"
    assert summary["minimal_dsl"] == "v v sqrt id keep ; m o1 id id div"
    assert summary["degenerate"] is False
    adam = json.loads(nos_sym("parse", "m v id sqrt div", "--format", "json").stdout)
    assert adam["key"] == summary["key"]


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("dsl", "g g id id keep"),
        ("latex", "g"),
        ("text", "degenerate: False"),
        ("text", "minimal_dsl: g g id id keep"),
    ],
)
def test_parse_formats(fmt, expected):
    done = nos_sym("parse", "g  g id id keep", "--format", fmt)
    assert done.returncode == 0 and expected in done.stdout


@pytest.mark.parametrize(
    ("rule", "where"),
    [("g g id id kep", "line 1, column 11"), ("", "line 1, column 1"), ("o1 g id id keep", "o1")],
)
def test_bad_rule_is_one_line_and_exit_2(rule, where):
    done = nos_sym("parse", rule)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and "Traceback" not in done.stderr


def test_tree_png_and_dot(tmp_path):
    for name, view in (("t.png", "expr"), ("t.dot", "dsl")):
        done = nos_sym(
            "tree",
            "sign_g sign_m id id mul ; o1 g exp id mul",
            "-o",
            str(tmp_path / name),
            "--view",
            view,
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / name).stat().st_size > 0


def test_tree_bad_output_is_one_line(tmp_path):
    done = nos_sym("tree", "g g id id keep", "-o", str(tmp_path / "missing" / "t.png"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    done = nos_sym("tree", "g g id id keep", "-o", str(tmp_path / "t.svg"))
    assert done.returncode == 2 and ".png or .dot" in done.stderr


def test_parse_shows_the_minimal_form():
    done = nos_sym("parse", "noise w_1e-1 drop_0.1 drop_0.1 keep ; m o1 sign id keep")
    assert done.returncode == 0, done.stderr
    assert "minimal_dsl: m m sign id keep" in done.stdout.splitlines()


def test_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "nos_sym", "parse", "g g id id keep", "--format", "dsl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "g g id id keep"


def test_evaluate_json_is_memoized_in_the_store(tmp_path):
    args = [
        "evaluate",
        "m v id sqrt div",
        "--dataset",
        "synthetic",
        "--protocol",
        "quick",
        "--store",
        str(tmp_path / "store.sqlite"),
        "--format",
        "json",
    ]
    first = nos_sym(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert set(result) == {
        "dsl",
        "key",
        "status",
        "reward",
        "best_lr",
        "sweep",
        "seconds",
        "device",
        "message",
        "protocol_hash",
        "seed",
        "test",
        "curve",
        "cached",
    }  # the EvalResult's to_json(), and whether it came from the store
    assert set(result["sweep"]) == {"0.001", "0.01", "0.1"}  # the quick protocol's rates
    assert result["status"] == "ok" and result["cached"] is False and 0 < result["reward"] <= 1
    second = json.loads(nos_sym(*args).stdout)
    assert second["cached"] is True and second["reward"] == result["reward"]
    adam = json.loads(nos_sym("evaluate", "adam g id id keep", *args[2:]).stdout)
    assert adam["cached"] is True and adam["key"] == result["key"]  # the same rule


def test_evaluate_degenerate_rule_trains_nothing(tmp_path):
    done = nos_sym(
        "evaluate",
        "one one id id add",
        "--dataset",
        "synthetic",
        "--store",
        str(tmp_path / "s.sqlite"),
        "--format",
        "json",
    )
    result = json.loads(done.stdout)
    assert result["status"] == "degenerate" and result["reward"] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["g g id id kep"], "line 1, column 11"),
        (["g g id id keep", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["g g id id keep", "--protocol", "long"], "unknown protocol 'long'"),
        (["g g id id keep", "--dataset", "cifar10"], "not found and downloads are disabled"),
        ([], "needs a RULE"),
    ],
)
def test_evaluate_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached CIFAR-10 from elsewhere
    monkeypatch.delenv("NOS_DATA", raising=False)
    done = nos_sym("evaluate", *args, "--store", str(tmp_path / "s.sqlite"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_evaluate_baselines_table():
    done = nos_sym(
        "evaluate",
        "--baselines",
        "--dataset",
        "synthetic",
        "--protocol",
        "quick",
        "--seeds",
        "0",
        "--format",
        "json",
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    names = {row["optimizer"] for row in rows}
    assert {"sgd", "momentum", "adam", "rmsprop", "powersign", "addsign"} <= names
    assert all(0 <= row["mean"] <= 1 and row["seeds"] == [0] for row in rows)
    table = nos_sym("evaluate", "--baselines", "--dataset", "synthetic", "--seeds", "0")
    assert table.stdout.startswith("| optimizer |") and "adam" in table.stdout


def test_report_html_and_png(run_dir, tmp_path):
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    done = nos_sym("report", str(run_dir), "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(page)] and not png.exists()
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    done = nos_sym("report", str(run_dir), "-o", str(png), "--html", str(page))
    assert done.stdout.splitlines() == [str(png), str(png.with_suffix(".md")), str(page)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to write: give -o FILE.png, --html FILE.html or both"),
        (["--html", "{tmp}/missing/r.html"], "cannot write {tmp}/missing/r.html"),
        (["-o", "{tmp}/missing/r.png"], "cannot write {tmp}/missing/r.png"),
    ],
)
def test_report_errors_are_one_line(run_dir, tmp_path, args, message):
    done = nos_sym("report", str(run_dir), *(arg.format(tmp=tmp_path) for arg in args))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert message.format(tmp=tmp_path) in lines[0]


def test_report_of_a_directory_that_is_no_run(tmp_path):
    done = nos_sym("report", str(tmp_path), "--html", str(tmp_path / "r.html"))
    assert done.returncode == 2 and "not a search run directory" in done.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    "content",
    [bytes(random.Random(1).randrange(256) for _ in range(1000)), b"not a database\n"],
    ids=["random-bytes", "text"],
)
def test_evaluate_with_a_store_that_is_not_sqlite(tmp_path, content):
    store = tmp_path / "store.sqlite"
    store.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    done = nos_sym("evaluate", "g g id id keep", "--dataset", "synthetic", "--store", str(store))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(store) in lines[0] and "not an SQLite database" in lines[0]
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest


def test_every_command_defines_its_arguments():
    from nos_sym.cli import COMMANDS, build_parser

    parser = build_parser()  # all of them, as `nos-sym CMD --help` would load each
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0
