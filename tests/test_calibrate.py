"""``nos-sym calibrate``: the statistics on hand-made numbers, the reference set, and the command
end to end on ``synthetic`` with two tiny protocols (resumable: a second run trains nothing)."""

from __future__ import annotations

import json
import math

import pytest

from nos_sym.cli import main
from nos_sym.controller.space import SearchSpace, get_space
from nos_sym.evaluation import calibrate
from nos_sym.evaluation.protocol import PROTOCOLS, Protocol

# two protocols cheap enough for a test (~0.3 s a candidate); "tiny" stands for the truth
TINY = {
    "micro": Protocol(
        name="micro",
        learning_rates=(1e-2,),
        sweep_examples=100,
        final_epochs=1,
        final_examples=100,
        batch_size=50,
        n_valid=200,
    ),
    "tiny": Protocol(
        name="tiny",
        learning_rates=(1e-2, 1e-1),
        sweep_examples=200,
        final_epochs=1,
        final_examples=200,
        batch_size=50,
        n_valid=200,
    ),
}


@pytest.mark.parametrize(
    ("scores", "truth", "fraction", "expected"),
    [
        ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], 0.1, 1.0),  # k = ⌈0.3⌉ = 1
        ([0.3, 0.2, 0.1], [0.1, 0.2, 0.3], 0.1, 0.0),
        ([0.1, 0.9, 0.8, 0.2], [0.0, 0.9, 0.1, 0.8], 0.5, 0.5),  # k = 2: {1, 2} vs {1, 3}
        ([0.5, 0.5, 0.1], [0.1, 0.5, 0.9], 0.1, 0.0),  # a tie: the lower index (0) is in
        ([0.5, 0.5, 0.1], [0.5, 0.1, 0.0], 0.1, 1.0),
        ([float(i) for i in range(11)], [float(i) for i in range(11)], 0.1, 1.0),  # k = 2
        ([], [], 0.1, None),
    ],
)
def test_precision_at(scores, truth, fraction, expected):
    assert calibrate.precision_at(scores, truth, fraction) == expected


@pytest.mark.parametrize(
    ("scores", "truth", "expected"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], (1.0, 1.0)),
        ([1, 2, 3, 4], [4, 3, 2, 1], (-1.0, -1.0)),
        ([1, 2, 3, 4], [1, 3, 2, 4], (0.8, 4 / 6)),  # one swapped pair: Σd² = 2, 1 of 6 pairs
        ([1, 1, 1, 1], [1, 2, 3, 4], (None, None)),  # a constant reward: undefined
        ([1], [1], (None, None)),
    ],
)
def test_rank_correlations(scores, truth, expected):
    got = calibrate.rank_correlations(scores, truth)
    assert got == pytest.approx(expected) if expected[0] is not None else got == expected


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([[0.5, 0.5], [0.2, 0.2]], 0.0),
        ([[0.4, 0.6], [0.2, 0.2]], 0.05),  # pstdev 0.1 and 0, mean 0.05
        ([[0.1, 0.2, 0.3]], math.sqrt(2 / 3) / 10),
    ],
)
def test_seed_std(rewards, expected):
    assert calibrate.seed_std(rewards) == pytest.approx(expected)


def test_protocol_stats_per_seed_and_mean():
    rewards = [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]  # seed 0 agrees with the truth, seed 1 not
    stats = calibrate.protocol_stats("quick", rewards, [1.0, 3.0], (0, 1), [0.8, 0.5, 0.2])
    assert stats.spearman == pytest.approx((1.0, -1.0)) and stats.precision == (1.0, 0.0)
    assert stats.means == pytest.approx((0.0, 0.0, 0.5)) and stats.seconds == 2.0
    truth = calibrate.protocol_stats("paper", rewards, [4.0], (0, 1), None)
    assert truth.spearman == (None, None) and truth.means == (None, None, None)


def test_reference_rules_are_distinct_live_and_seeded():
    space = get_space("small")
    rules = calibrate.reference_rules(["sgd", "adam", "powersign"], space, 6, sample_seed=3)
    names = [name for name, _ in rules]
    assert names[:3] == ["sgd", "adam", "powersign"] and len(rules) == 9
    assert names[3:] == [f"random-{i}" for i in range(6)]
    assert len({rule.key for _, rule in rules}) == 9
    assert not any(rule.is_degenerate for _, rule in rules)
    again = calibrate.reference_rules(["sgd", "adam", "powersign"], space, 6, sample_seed=3)
    assert [rule.key for _, rule in again] == [rule.key for _, rule in rules]
    assert len(calibrate.REFERENCE_PRESETS) == 23  # 8 baselines + Table 1 less PowerSign


@pytest.mark.parametrize(
    ("binary", "wanted", "message"),
    [
        (("sub",), 3, "only 2 token strings"),  # g − m, m − g
        (("mul", "sub"), 4, "found only 3 of 4"),  # g·m = m·g: 4 strings, 3 rules
    ],
)
def test_reference_rules_from_a_space_too_small(monkeypatch, binary, wanted, message):
    monkeypatch.setattr(calibrate, "MAX_DRAWS_PER_RULE", 10)
    space = SearchSpace(operands=("g", "m"), unary=("id",), binary=binary, groups=1)
    with pytest.raises(ValueError, match=message):
        calibrate.reference_rules([], space, wanted, sample_seed=0)


@pytest.fixture
def tiny_protocols(monkeypatch):
    for name, protocol in TINY.items():
        monkeypatch.setitem(PROTOCOLS, name, protocol)


def test_calibrate_end_to_end_then_nothing_paid_twice(tmp_path, tiny_protocols, capsys):
    args = [
        "calibrate",
        "--dataset",
        "synthetic",
        "--protocols",
        "micro,tiny",
        "--seeds",
        "0",
        "1",
        "--presets",
        "sgd,adam",
        "--random",
        "2",
        "--space",
        "small",
        "--store",
        str(tmp_path / "store.sqlite"),
        "-o",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "4 rules × 2 protocols × 2 seeds: 16 trained, 0 from the store" in first
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "calibration.json",
        "calibration.md",
        "scatter-micro.png",
    ]
    assert (out / "scatter-micro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "calibration.md").read_text()
    assert "nos-sym calibrate --task child --dataset synthetic --protocols micro,tiny" in table
    assert "4 rules" in table and "| micro |" in table and "| tiny |" in table
    report = json.loads((out / "calibration.json").read_text())
    assert report["truth"] == "tiny" and [s["protocol"] for s in report["stats"]] == [
        "micro",
        "tiny",
    ]
    assert [rule["name"] for rule in report["rules"]] == ["sgd", "adam", "random-0", "random-1"]
    for rule in report["rules"]:
        assert {p: len(r) for p, r in rule["rewards"].items()} == {"micro": 2, "tiny": 2}
        assert rule["truth"] == pytest.approx(sum(rule["rewards"]["tiny"]) / 2)
    micro = report["stats"][0]
    assert len(micro["spearman"]) == 2 and micro["seconds"] > 0
    assert 0 <= micro["mean_precision"] <= 1  # k = ⌈0.4⌉ = 1

    assert main(args) == 0  # the same command again: everything comes from the store
    second = capsys.readouterr().out
    assert "0 trained, 16 from the store" in second
    assert json.loads((out / "calibration.json").read_text())["rules"] == report["rules"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--protocols", "quick"], "at least two protocols"),
        (["--protocols", "quick,long"], "unknown protocol 'long'"),
        (["--protocols", "quick,quick"], "given twice"),
        (["--presets", "sgd,nadam"], "unknown preset 'nadam'"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--space", "huge"], "unknown space 'huge'"),
        (["--random", "-1"], "--random must be"),
        (["--seeds", "0", "0"], "a seed twice"),
        (["--presets", "sgd", "--random", "0"], "at least two rules"),
        (["--space", "small", "--random", "1000000000"], "token strings"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, options, message):
    store = tmp_path / "store.sqlite"
    done = main(["calibrate", "--dataset", "synthetic", *options, "-o", str(tmp_path / "o")])
    assert done == 2 and not store.exists() and not (tmp_path / "o").exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
