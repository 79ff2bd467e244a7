"""The task interface: identities, FunctionTask, get_task specs, the Python entry points, the
built-in child and rosenbrock tasks on tiny settings, and --task on the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import nos_sym
from nos_sym.cli import main
from nos_sym.evaluation.evaluator import evaluate as evaluate_child
from nos_sym.evaluation.protocol import Protocol
from nos_sym.evaluation.store import RewardStore
from nos_sym.tasks import (
    ChildTask,
    FunctionTask,
    RosenbrockTask,
    Task,
    TaskError,
    TaskRun,
    evaluate_rule,
    get_task,
)

CALLS: list[float] = []


def quadratic(make_optimizer, lr: float, seed: int, steps: int) -> float:
    """−log10 of ½‖w‖² after ``steps`` steps from a seeded start (module level: picklable)."""
    CALLS.append(lr)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(8, generator=generator, requires_grad=True)
    optimizer = make_optimizer([weights])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * weights.pow(2).sum()).backward()
        optimizer.step()
    return -math.log10(0.5 * float(weights.detach().pow(2).sum()) + 1e-30)


QUADRATIC = FunctionTask("quadratic", 1, quadratic)
"""A user task, importable as ``tests.test_tasks:QUADRATIC`` (or ``test_tasks:QUADRATIC``)."""
TINY = Protocol(
    name="tiny-task",
    learning_rates=(1e-3, 1e-2, 1e-1),
    sweep_examples=10,
    final_examples=20,
    final_epochs=1,
    batch_size=1,
    n_valid=1,
)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (ChildTask(), ChildTask(dataset="fashion-mnist"), True),
        (ChildTask(), ChildTask(dataset="synthetic"), False),
        (FunctionTask("q", 1, quadratic), FunctionTask("q", 1, len), True),  # fn not in identity
        (FunctionTask("q", 1, quadratic), FunctionTask("q", 2, quadratic), False),
        (FunctionTask("q", 1, quadratic), FunctionTask("r", 1, quadratic), False),
        (FunctionTask("q", 1, quadratic, config={"n": 1}), FunctionTask("q", 1, quadratic), False),
        (RosenbrockTask(), RosenbrockTask(), True),
    ],
)
def test_identity_is_name_version_and_config(a: Task, b: Task, same: bool) -> None:
    assert (a.identity == b.identity) is same
    assert a.identity.startswith(f"{a.name}@{a.version}/")


def test_task_run_of_a_bare_metric() -> None:
    assert TaskRun.of(0.5) == TaskRun(metric=0.5)
    assert TaskRun.of(math.nan) == TaskRun(metric=0.0, diverged=True)
    assert TaskRun.of(TaskRun(math.inf, curve=(1.0,))).diverged


def test_function_task_sweeps_then_trains_the_best_lr_again() -> None:
    CALLS.clear()
    result = evaluate_rule("sgd", task=QUADRATIC, protocol=TINY, seed=3)
    assert result.status == "ok" and result.best_lr == 0.1
    assert CALLS == [1e-3, 1e-2, 1e-1, 0.1]
    assert result.reward == pytest.approx(
        quadratic(lambda p: torch.optim.SGD(p, lr=0.1), 0.1, 3, 20)
    )
    assert set(result.sweep) == set(TINY.learning_rates)


def test_a_failing_or_diverging_function_task_is_reported_not_raised() -> None:
    def broken(make_optimizer, lr, seed, steps):
        raise RuntimeError("out of memory")

    failed = evaluate_rule("sgd", task=FunctionTask("broken", 1, broken), protocol=TINY)
    assert (failed.status, failed.message) == ("failed", "RuntimeError: out of memory")
    nan = evaluate_rule("sgd", task=FunctionTask("nan", 1, lambda *a: math.nan), protocol=TINY)
    assert (nan.status, nan.reward) == ("diverged", 0.0)


def test_the_child_task_gives_the_evaluators_rewards_bit_for_bit() -> None:
    task = get_task("child", dataset="synthetic")
    for rule in ("powersign", "m v id sqrt div"):
        through_task = evaluate_rule(rule, task=task, protocol="quick")
        direct = evaluate_child(rule, dataset="synthetic", protocol="quick")
        assert dataclasses.replace(through_task, seconds=0.0) == dataclasses.replace(
            direct, seconds=0.0
        )
    single = task.run(
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lr=1e-2,
        seed=0,
        steps=task.steps(task.protocol("quick"), False),
        protocol=task.protocol("quick"),
        final=False,
    )
    assert 0.0 < single.metric <= 1.0 and not single.diverged


def test_rosenbrock_task_on_a_short_protocol() -> None:
    short = Protocol(
        name="short",
        learning_rates=(1e-3, 1e-2),
        sweep_examples=200,
        final_epochs=1,
        final_examples=200,
        batch_size=1,
        n_valid=1,
    )
    result = evaluate_rule("adam", task=RosenbrockTask(), protocol=short)
    assert result.status == "ok" and result.best_lr in (1e-3, 1e-2)
    assert len(result.curve) == 3 and result.curve[-1] == pytest.approx(
        result.reward
    )  # t = 0, 100, 200
    assert RosenbrockTask().protocol().name == "rosenbrock"


@pytest.mark.parametrize(
    ("spec", "dataset", "expected"),
    [
        ("child", None, ChildTask()),
        ("child", "synthetic", ChildTask(dataset="synthetic")),
        ("child,dataset=cifar10", "synthetic", ChildTask(dataset="cifar10")),  # spec wins
        (" rosenbrock ", "synthetic", RosenbrockTask()),  # no dataset option: ignored
        ("tests.test_tasks:QUADRATIC", None, QUADRATIC),
    ],
)
def test_get_task_specs(spec: str, dataset: str | None, expected: Task) -> None:
    assert get_task(spec, dataset=dataset).identity == expected.identity


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("mnist-net", "unknown task 'mnist-net'"),
        ("child,width=2", "has no option 'width'"),
        ("child,dataset", "expected option=value"),
        ("no_such_module_x:TASK", "cannot import 'no_such_module_x'"),
        ("tests.test_tasks:NOTHING", "has no attribute 'NOTHING'"),
        ("tests.test_tasks:TINY", "is not a nos_sym Task"),
        ("quadratic@1/0123456789abcdef", "given from Python"),
    ],
)
def test_bad_task_specs_are_one_clear_error(spec: str, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        get_task(spec)


def test_evaluate_entry_point_memoizes_and_a_version_bump_pays_again(tmp_path) -> None:
    path = tmp_path / "store.sqlite"
    CALLS.clear()
    first = nos_sym.evaluate("sgd", task=QUADRATIC, protocol=TINY, seed=1, store=path)
    assert len(CALLS) == 4
    again = nos_sym.evaluate("g one id id mul", task=QUADRATIC, protocol=TINY, seed=1, store=path)
    assert again == first and len(CALLS) == 4  # the same key: answered by the store
    bumped = FunctionTask("quadratic", 2, quadratic)
    with RewardStore(path) as store:
        nos_sym.evaluate("sgd", task=bumped, protocol=TINY, seed=1, store=store)
        assert len(CALLS) == 8  # a new version never reuses a reward
        assert set(store.tasks()) == {QUADRATIC.identity, bumped.identity}
    plain = nos_sym.evaluate("sgd", task=QUADRATIC, protocol=TINY, seed=1)  # no store: trains
    assert len(CALLS) == 12 and plain.reward == first.reward


def test_search_entry_point_on_a_function_task_with_the_process_backend(tmp_path) -> None:
    run = tmp_path / "run"
    options = {"budget": 4, "algo": "random", "run_dir": run, "space": "small", "batch": 2}
    outcome = nos_sym.search(task=QUADRATIC, backend="process", workers=2, **options)
    assert outcome.counts.evaluated == 4
    assert outcome.leaderboard and outcome.leaderboard[0]["reward"] > 0
    assert json.loads((run / "config.json").read_text())["task"] == QUADRATIC.identity
    with RewardStore(run / "store.sqlite") as store:
        assert store.tasks() == {QUADRATIC.identity: QUADRATIC.describe()}
    # resumed with the same object: nothing more to pay
    again = nos_sym.search(task=QUADRATIC, backend="inline", workers=2, **options)
    assert again.counts.evaluated == 4
    with pytest.raises(nos_sym.errors.SearchError, match=r"another config \(task: .quadratic@1/"):
        nos_sym.search(task=FunctionTask("quadratic", 2, quadratic), **options)


def test_a_run_directory_written_before_tasks_resumes_as_the_child(tmp_path) -> None:
    run = tmp_path / "run"
    options = {"space": "small", "batch": 2, "backend": "inline", "algo": "random"}
    nos_sym.search(task="child", budget=2, run_dir=run, dataset="synthetic", **options)
    config = json.loads((run / "config.json").read_text())
    del config["task"]  # as the code before tasks wrote it
    (run / "config.json").write_text(json.dumps(config))
    resumed = nos_sym.search(task="child", budget=3, run_dir=run, dataset="synthetic", **options)
    assert resumed.counts.evaluated == 3


def test_cli_task_option(tmp_path, capsys) -> None:
    store = str(tmp_path / "store.sqlite")
    argv = ["evaluate", "powersign", "--task", "tests.test_tasks:QUADRATIC", "--store", store]
    assert main([*argv, "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "ok" and first["cached"] is False
    assert main([*argv, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True
    assert main(["evaluate", "sgd", "--task", "nonesuch", "--store", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'nonesuch'" in err[0]
    assert main(["evaluate", "sgd", "--task", "rosenbrock", "--protocol", "paperz"]) == 2
    assert "unknown protocol 'paperz'" in capsys.readouterr().err


def test_a_function_task_on_ray(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    options = {"budget": 3, "algo": "random", "space": "small", "batch": 3, "workers": 2}
    try:
        outcome = nos_sym.search(task=QUADRATIC, run_dir=tmp_path / "run", backend="ray", **options)
    finally:
        ray.shutdown()
    assert outcome.counts.evaluated == 3 and outcome.counts.failed == 0
