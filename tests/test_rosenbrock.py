"""The Rosenbrock task (paper Figure 6): f and ∇f, the metric, batching that is exact and keeps a
diverged run in its row, the ε sweep, and ``nos-sym rosenbrock`` (tiny settings, seconds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import markdown
import numpy as np
import pytest
import torch

from nos_sym.cli import main
from nos_sym.tasks import rosenbrock as R

NOS_SYM = str(Path(sys.executable).with_name("nos-sym"))
STARTS = ((-1.2, 1.0), (0.0, 0.0), (1.5, 1.0))


@pytest.mark.parametrize(
    ("point", "loss", "gradient"),
    [
        ((1.0, 1.0), 0.0, (0.0, 0.0)),
        ((0.0, 0.0), 1.0, (-2.0, 0.0)),
        ((-1.2, 1.0), 24.2, (-215.6, -88.0)),
        ((1.0, 2.0), 100.0, (-400.0, 200.0)),
    ],
)
def test_loss_and_gradient_at_known_points(point, loss, gradient):
    xy = torch.tensor(point, dtype=torch.float64)
    assert R.loss(xy).item() == pytest.approx(loss, abs=1e-12)
    assert R.gradient(xy).tolist() == pytest.approx(gradient, abs=1e-12)


def test_gradient_is_autograd_of_loss():
    xy = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xy.requires_grad_()
    R.loss(xy).sum().backward()
    torch.testing.assert_close(R.gradient(xy.detach()), xy.grad)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (1.0, 0.0),
        (1e-3, 3.0),
        (0.0, -math.log10(R.LOSS_FLOOR)),
        (float("nan"), R.DIVERGED_METRIC),
        (float("inf"), R.DIVERGED_METRIC),
        (1e400, R.DIVERGED_METRIC),
    ],
)
def test_metric(loss, expected):
    assert float(R.metric(loss)) == pytest.approx(expected)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equal, NaN equal to NaN."""
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize(
    ("rule", "epsilons"),
    [("sgd", (None,)), ("adam", (1e-3, 1e-8)), ("powersign-cd", (None,)), ("addsign", (None,))],
)
def test_batched_run_equals_single_runs_and_divergence_stays_in_its_row(rule, epsilons):
    lrs = (1e-4, 1e-3, 10.0)  # 10 overflows to NaN for every rule here but Adam
    steps = 30
    batch = R.run(rule, lrs, STARTS, steps, epsilons)
    assert batch.losses.shape == (len(epsilons), len(lrs), len(STARTS), steps + 1)
    assert batch.paths.shape == (*batch.losses.shape, 2)
    for e, eps in enumerate(epsilons):
        for i, lr in enumerate(lrs):
            for s, start in enumerate(STARTS):
                alone = R.run(rule, [lr], [start], steps, [eps])
                assert _same(batch.paths[e, i, s], alone.paths[0, 0, 0]), (eps, lr, start)
                assert _same(batch.losses[e, i, s], alone.losses[0, 0, 0]), (eps, lr, start)
    assert np.all(batch.metrics[:, 2] < 0)  # lr 10: worse than where it started
    if rule != "adam":
        assert np.all(batch.metrics[:, 2] == R.DIVERGED_METRIC)
    assert np.all(np.isfinite(batch.losses[:, :2]))  # its NaN reached no other row


def test_random_rule_is_reproducible_by_seed():
    runs = [R.run("powersign-drop-0.3", (1e-3,), STARTS, 20, seed=seed) for seed in (1, 1, 2)]
    assert np.array_equal(runs[0].paths, runs[1].paths)
    assert not np.array_equal(runs[0].paths, runs[2].paths)


def test_run_rejects_an_empty_sweep():
    with pytest.raises(ValueError, match="at least one lr"):
        R.run("sgd", (), STARTS, 10)


def test_eps_sweep_only_for_rules_that_read_eps():
    assert R.epsilons_for("adam") == R.EPSILONS == (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    assert R.epsilons_for("rmsprop") == R.EPSILONS
    assert R.epsilons_for("drop-m-div-exp-g2") == R.EPSILONS  # div adds ε
    for rule in ("sgd", "momentum", "powersign", "addsign-cd"):
        assert R.epsilons_for(rule) == (None,)
    steps, lrs = 20, (1e-3, 1e-2)
    assert R.best("sgd", lrs, STARTS, steps).sweep.epsilons == (None,)
    adam = R.best("adam", lrs, STARTS, steps)
    assert adam.sweep.epsilons == R.EPSILONS
    assert adam.eps in R.EPSILONS
    assert not np.array_equal(adam.sweep.paths[0], adam.sweep.paths[-1])  # ε matters for Adam


def test_best_is_the_highest_mean_and_a_torch_optimizer_runs_too():
    lrs, steps = (1e-4, 1e-3, 10.0), 50
    result = R.best("sgd", lrs, STARTS, steps)
    means = result.sweep.metrics.mean(axis=-1)
    assert result.mean == pytest.approx(means.max())
    assert result.lr == lrs[int(np.argmax(means[0]))] and result.eps is None
    assert len(result.metrics) == len(STARTS) == len(result.final_losses)
    assert result.std == pytest.approx(np.std(result.metrics, ddof=1))
    # a torch.optim optimizer from a factory: torch's SGD is the preset ``sgd``, w ← w − lr·g
    torch_sgd = R.best(torch.optim.SGD, lrs, STARTS, steps)
    assert torch_sgd.sweep.epsilons == (None,)
    np.testing.assert_allclose(torch_sgd.sweep.paths, result.sweep.paths, rtol=1e-12)


def _nos_sym(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NOS_SYM, *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_table_json_and_figures(tmp_path):
    out = tmp_path / "out"
    done = _nos_sym(
        "rosenbrock", "sgd", "adam", "m v id sqrt div", "-o", str(out),
        "--steps", "20", "--lrs", "1e-3", "1e-2", "--epsilons", "1e-3", "1e-8",
        "--start", "-1.2", "1", "--start", "0", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("rosenbrock_paths.png", "rosenbrock_losses.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "rosenbrock.md").read_text()
    html = markdown.markdown(table, extensions=["tables"])
    assert html.count("<table>") == 1 and html.count("<tr>") == 1 + 3
    assert "(-1.2, 1)" in html and "<code>m v id sqrt div</code>" in html
    summary = json.loads((out / "rosenbrock.json").read_text())
    assert summary["steps"] == 20 and summary["starts"] == [[-1.2, 1.0], [0.0, 0.0]]
    rows = {row["name"]: row for row in summary["rules"]}
    assert rows["sgd"]["eps"] is None and rows["adam"]["eps"] in (1e-3, 1e-8)
    assert len(rows["adam"]["sweep_mean"]) == 2 and len(rows["sgd"]["sweep_mean"]) == 1


def test_cli_all_diverged_writes_strict_json_and_figures(tmp_path):
    out = tmp_path / "out"
    assert main(["rosenbrock", "sgd", "-o", str(out), "--steps", "20", "--lrs", "10"]) == 0
    text = (out / "rosenbrock.json").read_text()
    (row,) = json.loads(text, parse_constant=pytest.fail)["rules"]  # no NaN, no Infinity
    assert row["final_losses"] == [None] * len(R.STARTS)
    assert row["metrics"] == [R.DIVERGED_METRIC] * len(R.STARTS)
    assert (out / "rosenbrock_paths.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("g g id id kep",), "column 11"),
        (("sgd", "--lrs", "-1"), "--lrs must be positive"),
        (("sgd", "--steps", "0"), "--steps must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["rosenbrock", *args, "-o", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()
