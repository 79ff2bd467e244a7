"""The task ``seq`` (the GNMT stand-in) on tiny settings: deterministic, disjoint data; identity;
deterministic runs; a rule scored end to end with its curve and test BLEU; divergence."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from nos_sym.evaluation.protocol import Protocol
from nos_sym.tasks import TaskError, TaskRun, evaluate_rule, get_task
from nos_sym.tasks import seq as S

TINY = "seq,train_size=64,valid_size=8,test_size=8,d_model=16,heads=2,curve_points=2"


def _tiny(**changes) -> S.TranslationTask:
    return dataclasses.replace(get_task(TINY), **changes)


def test_sentence_pairs_follow_the_grammar():
    rng = random.Random(0)
    for _ in range(200):
        source, target = S.sentence_pair(rng)
        assert source.endswith(".") and target.endswith(".")
        words = S.tokens(target)
        assert words[-2].endswith(("at", "ant", "it", "int"))  # the verb comes last (SOV)


def test_the_documented_sample_pair_is_in_the_default_training_split():
    pair = (
        "two small happy farmers did not like the lamb behind a white queen.",
        "du gosun piki feli unar sira blanka post len agno ne amint.",
    )
    assert pair in S.TranslationTask().corpus().text["train"]


def test_data_is_deterministic_and_splits_disjoint():
    first = S.corpus(5, 300, 50, 50)
    S.corpus.cache_clear()
    again = S.corpus(5, 300, 50, 50)
    assert first is not again and first.text == again.text
    assert all(torch.equal(first.target[s], again.target[s]) for s in ("train", "valid", "test"))
    sources = {split: {pair[0] for pair in first.text[split]} for split in first.text}
    assert [len(sources[s]) for s in ("train", "valid", "test")] == [300, 50, 50]
    assert not (sources["train"] & sources["valid"] or sources["train"] & sources["test"])
    assert not sources["valid"] & sources["test"]
    assert S.corpus(6, 300, 50, 50).text != first.text


def test_identity_differs_across_fields_and_version():
    class Bumped(S.TranslationTask):
        version = 2

    base = S.TranslationTask()
    variants = [
        base,
        S.TranslationTask(data_seed=1),
        S.TranslationTask(layers=2),
        S.TranslationTask(train_size=100),
        Bumped(),
    ]
    assert len({task.identity for task in variants}) == len(variants)
    assert S.TranslationTask().identity == base.identity
    assert get_task("seq,layers=2,data_seed=3") == S.TranslationTask(layers=2, data_seed=3)


@pytest.mark.parametrize("spec", ["seq,d_model=10,heads=4", "seq,train_size=0", "seq,width=2"])
def test_bad_options_are_one_clear_error(spec):
    with pytest.raises(TaskError, match="task"):
        get_task(spec)


def _run(task: S.TranslationTask, lr: float, seed: int, final: bool = True) -> TaskRun:
    protocol = task.protocol()
    steps = task.steps(protocol, final)
    return task.run(
        lambda params: torch.optim.Adam(params, lr=lr),
        lr=lr,
        seed=seed,
        steps=steps,
        protocol=protocol,
        final=final,
    )


def test_a_run_is_deterministic_per_seed():
    task = _tiny()
    assert task.steps(task.protocol(), False) == 2  # one epoch of the 64 pairs, batch 32
    assert task.steps(task.protocol(), True) == 4
    first = _run(task, 1e-2, seed=0)
    assert first == _run(task, 1e-2, seed=0)
    assert not first.diverged and len(first.curve) == 2 and first.curve[-1] == first.metric
    same = [
        torch.equal(a, b)
        for a, b in zip(
            task.model(0).state_dict().values(), task.model(0).state_dict().values(), strict=True
        )
    ]
    assert all(same)
    other = task.model(1).state_dict()
    assert not torch.equal(task.model(0).state_dict()["output.weight"], other["output.weight"])


def test_evaluate_rule_scores_bleu_with_curve_and_test():
    result = evaluate_rule("adam", task=get_task(TINY), seed=0)
    assert result.status == "ok", result.message
    assert result.best_lr in S.PROTOCOL.learning_rates
    assert set(result.sweep) == set(S.PROTOCOL.learning_rates)
    assert result.test is not None and 0.0 <= result.test <= 100.0
    assert len(result.curve) == 2 and result.curve[-1] == result.reward


def test_a_huge_learning_rate_diverges_cleanly():
    assert _run(_tiny(), 1e30, seed=0, final=False) == TaskRun(metric=0.0, diverged=True)
    huge = Protocol(
        name="huge",
        learning_rates=(1e30,),
        sweep_examples=64,
        final_examples=64,
        batch_size=32,
        n_valid=8,
    )
    result = evaluate_rule("sgd", task=_tiny(), protocol=huge, seed=0)
    assert (result.status, result.reward, result.test) == ("diverged", 0.0, None)
