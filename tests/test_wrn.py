"""The task ``wrn`` (a Wide ResNet) on tiny settings: identity, determinism and the shared
initialisation, a rule scored end to end, divergence, and how the default data set is resolved."""

from __future__ import annotations

import dataclasses
import pickle
from typing import ClassVar

import pytest
import torch

from nos_sym.evaluation import datasets
from nos_sym.evaluation.protocol import Protocol
from nos_sym.tasks import TaskError, evaluate_rule, get_task
from nos_sym.tasks import wrn as W

TINY = "wrn,dataset=synthetic,depth=10,width=1,test_examples=200"
PROTOCOL = Protocol(
    name="wrn-tiny",
    learning_rates=(1e-3, 1e-2),
    sweep_examples=100,
    final_epochs=2,
    final_examples=100,
    batch_size=50,
    n_valid=200,
)


def tiny() -> W.WideResNetTask:
    task = get_task(TINY)
    assert isinstance(task, W.WideResNetTask)
    return task


class Bumped(W.WideResNetTask):
    version: ClassVar[int | str] = 2


@pytest.mark.parametrize(
    "other",
    [
        "wrn,dataset=synthetic,depth=10,width=2,test_examples=200",
        "wrn,dataset=fashion-mnist,depth=10,width=1,test_examples=200",
        "wrn,dataset=synthetic,depth=16,width=1,test_examples=200",
        "wrn,dataset=synthetic,depth=10,width=1,test_examples=100",
    ],
)
def test_identity_covers_the_configuration(other):
    assert get_task(other).identity != tiny().identity
    assert get_task(TINY).identity == tiny().identity


def test_identity_covers_the_version():
    bumped = Bumped(**dataclasses.asdict(tiny()))
    assert bumped.identity != tiny().identity
    assert bumped.identity.startswith("wrn@2/") and tiny().identity.startswith("wrn@1/")


def adam_recording(initial: list[list[torch.Tensor]], lr: float):
    """``make_optimizer`` for Adam at ``lr`` that records the parameters it starts from."""

    def make(params):
        params = list(params)
        initial.append([p.detach().clone() for p in params])
        return torch.optim.Adam(params, lr=lr)

    return make


def test_run_is_deterministic_and_shares_the_init_across_lrs_and_the_final_run():
    task = tiny()
    initial: list[list[torch.Tensor]] = []
    runs = [
        task.run(
            adam_recording(initial, lr),
            lr=lr,
            seed=0,
            steps=task.steps(PROTOCOL, final),
            protocol=PROTOCOL,
            final=final,
        )
        for lr, final in ((1e-2, False), (1e-2, False), (1e-3, False), (1e-2, True))
    ]
    assert runs[0] == runs[1]
    assert runs[0].test is None and runs[0].curve == ()
    assert len(runs[3].curve) == W.CURVE_POINTS and runs[3].curve[-1] == runs[3].metric
    assert runs[3].test is not None and 0.0 <= runs[3].test <= 1.0
    for params in initial[1:]:
        assert all(torch.equal(a, b) for a, b in zip(initial[0], params, strict=True))
    task.run(
        adam_recording(initial, 1e-2), lr=1e-2, seed=1, steps=1, protocol=PROTOCOL, final=False
    )
    assert not all(torch.equal(a, b) for a, b in zip(initial[0], initial[-1], strict=True))


def test_evaluate_rule_scores_a_rule_with_curve_and_test():
    result = evaluate_rule("adam", task=tiny(), protocol=PROTOCOL)
    assert result.status == "ok", result.message
    assert result.best_lr in PROTOCOL.learning_rates and 0.0 < result.reward <= 1.0
    assert len(result.curve) == W.CURVE_POINTS and result.curve[-1] == result.reward
    assert result.test is not None and 0.0 <= result.test <= 1.0


def test_a_huge_learning_rate_diverges_cleanly():
    task = tiny()
    run = task.run(
        lambda params: torch.optim.SGD(params, lr=1e30),
        lr=1e30,
        seed=0,
        steps=task.steps(PROTOCOL, True),
        protocol=PROTOCOL,
        final=True,
    )
    assert run.diverged and run.metric == 0.0 and run.test is None
    huge = dataclasses.replace(PROTOCOL, learning_rates=(1e30,))
    result = evaluate_rule("sgd", task=task, protocol=huge)
    assert result.status == "diverged" and result.reward == 0.0


def test_the_task_declares_its_protocol():
    task = W.WideResNetTask(dataset="synthetic")
    protocol = task.protocol()
    assert protocol is W.PROTOCOL and task.protocol("wrn") is W.PROTOCOL
    assert {1e-4, 1.0} <= set(protocol.learning_rates)
    assert task.steps(protocol, False) < task.steps(protocol, True)


@pytest.mark.parametrize(
    ("cifar10_here", "expected"), [(True, "cifar10"), (False, "fashion-mnist")]
)
def test_the_default_data_set_is_resolved_without_downloading(monkeypatch, cifar10_here, expected):
    def local(name, root=None):
        assert name == "cifar10"
        return object() if cifar10_here else None

    monkeypatch.setattr(datasets, "load_local", local)
    task = get_task("wrn")
    assert task.dataset == expected
    assert pickle.loads(pickle.dumps(task)) == task  # the resolved name travels to workers
    assert get_task("wrn").identity == task.identity


def test_get_task_wrn_resolves_a_data_set_here():
    assert get_task("wrn").dataset in ("cifar10", "fashion-mnist")


def test_load_local_never_downloads(monkeypatch, tmp_path):
    monkeypatch.delenv("NOS_OFFLINE", raising=False)
    monkeypatch.delenv("NOS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "SYSTEM_DIR", tmp_path / "system")

    def no_download(name):
        raise AssertionError(f"tried to download {name}")

    monkeypatch.setattr(datasets, "download", no_download)
    assert datasets.load_local("cifar10") is None
    assert datasets.load_local("synthetic").name == "synthetic"


@pytest.mark.parametrize(
    "spec", ["wrn,depth=15", "wrn,width=0", "wrn,dataset=mnist", "wrn,test_examples=0"]
)
def test_bad_options_are_one_clear_error(spec):
    with pytest.raises(TaskError, match="task 'wrn"):
        get_task(spec)
