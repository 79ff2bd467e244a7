"""The evaluation protocol, the child network, the single and batched evaluators, the baselines.

Everything trains on the ``synthetic`` data set under :data:`TINY`, a protocol of a few steps, so
the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nos_sym.evaluation import datasets, evaluator
from nos_sym.evaluation.baselines import BASELINES, baseline_table, evaluate_baseline
from nos_sym.evaluation.child import StackedChild, image_patches, init_child, patch_moments
from nos_sym.evaluation.evaluator import (
    EvalResult,
    evaluate,
    evaluate_batch,
    evaluate_optimizer,
)
from nos_sym.evaluation.protocol import PROTOCOLS, Protocol, epoch_order, get_protocol
from nos_sym.presets import PRESETS
from nos_sym.symbolic_optim import SymbolicOptimizer

TINY = Protocol(
    name="tiny",
    learning_rates=(0.01, 0.1),
    sweep_examples=400,
    final_examples=400,
    final_epochs=2,
    batch_size=50,
    n_valid=300,
)
TINY_FP32 = dataclasses.replace(TINY, precision="fp32")
SGD = "g g id id keep"
ADAM = "adam g id id keep"
EXPLODES = "one g id id div ; o1 o1 exp id keep"  # exp(1/(g + ε)) = inf wherever g = 0
POWERSIGN_LD = "sign_g sign_m id id mul ; o1 ld id id mul ; o2 g exp id mul"  # needs total_steps
DROPOUT = "sign_g sign_m id id mul ; o1 g exp drop_0.3 mul"  # random draws


@pytest.fixture(scope="module")
def synthetic() -> datasets.Dataset:
    return datasets.load("synthetic")


def sgd_factory(params, lr, total_steps):
    return torch.optim.SGD(params, lr=lr)


# --- protocol ------------------------------------------------------------------------------------


def test_paper_protocol_is_section_4_2():
    paper = get_protocol("paper")
    assert paper.learning_rates == tuple(10.0**i for i in range(-5, 2))
    assert (paper.sweep_epochs, paper.sweep_examples, paper.batch_size) == (1, 10_000, 100)
    assert (paper.final_epochs, paper.final_examples, paper.n_valid) == (5, 10_000, 5_000)
    assert paper.sweep_steps == 100
    assert paper.final_steps(train_size=55_000) == 500
    full = dataclasses.replace(paper, final_examples=None)
    assert full.final_steps(train_size=55_000) == 2_750


def test_protocol_hash_is_stable():
    """Changing this value means stored rewards no longer match: bump PROTOCOL_VERSION instead
    of editing the expected hash without thought."""
    paper = get_protocol("paper")
    assert paper.hash == PAPER_HASH
    assert Protocol(**dataclasses.asdict(paper)).hash == PAPER_HASH


PAPER_HASH = "cec1cc5c8c78c92258d096a417e99fc859fe170b7f9b0ca416204eccf6e7a366"
OTHER_VALUES = {
    "name": "other",
    "learning_rates": (0.1,),
    "sweep_epochs": 2,
    "sweep_examples": 5_000,
    "final_epochs": 3,
    "final_examples": None,
    "batch_size": 50,
    "n_valid": 1_000,
    "split_seed": 1,
    "precision": "fp32",
    "memory_format": "contiguous",
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Protocol)])
def test_protocol_hash_changes_with_every_field(field):
    paper = get_protocol("paper")
    changed = dataclasses.replace(paper, **{field: OTHER_VALUES[field]})
    assert changed.hash != paper.hash


def test_protocol_rejects_bad_settings():
    with pytest.raises(ValueError, match="precision"):
        Protocol(name="x", precision="fp16")
    with pytest.raises(ValueError, match="learning_rates"):
        Protocol(name="x", learning_rates=(0.0,))
    with pytest.raises(ValueError, match="cover a batch"):
        Protocol(name="x", sweep_examples=10, batch_size=100)
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("nope")
    assert set(PROTOCOLS) >= {"paper", "quick"}


def test_existing_protocols_keep_their_hashes_and_screen_sits_between():
    # a protocol's hash is its rewards' identity in every store: these never change
    assert PROTOCOLS["paper"].hash.startswith("cec1cc5c8c78")
    assert PROTOCOLS["quick"].hash.startswith("ee32e4d64531")
    steps = {
        name: len(p.learning_rates) * p.sweep_steps + p.final_steps(55_000)
        for name, p in PROTOCOLS.items()
    }
    assert steps["quick"] < steps["screen"] <= steps["paper"] / 4
    screen, paper = PROTOCOLS["screen"], PROTOCOLS["paper"]
    assert (min(screen.learning_rates), max(screen.learning_rates)) == (
        min(paper.learning_rates),
        max(paper.learning_rates),
    )


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(seed=0, epoch=0, examples=100)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, epoch_order(seed=0, epoch=0, examples=100))
    assert not torch.equal(order, epoch_order(seed=0, epoch=1, examples=100))
    assert not torch.equal(order, epoch_order(seed=1, epoch=0, examples=100))


# --- child network -------------------------------------------------------------------------------


def test_image_patches_match_unfold():
    x = torch.randn(2, 3, 5, 6)
    patches = image_patches(x)
    expected = F.unfold(x, 3, padding=1).transpose(1, 2).flatten(0, 1)
    torch.testing.assert_close(patches[:, :-1], expected, rtol=0, atol=0)
    assert torch.all(patches[:, -1] == 1)


def test_stacked_child_is_k_independent_child_nets():
    """Forward, per-model loss gradients and BN statistics of the stacked form equal K separate
    ChildNets (the folded first layer is exact up to float rounding)."""
    torch.manual_seed(0)  # the inputs must not depend on which tests ran before
    shape, classes, copies = (3, 12, 12), 5, 3
    stacked = StackedChild(init_child(shape, classes, seed=0), copies)
    with torch.no_grad():
        stacked.params.add_(0.1 * torch.randn_like(stacked.params))  # make the copies differ
    nets = [stacked.model(k).train() for k in range(copies)]
    x, y = torch.randn(8, *shape), torch.randint(0, classes, (8,))

    losses = stacked.losses(x, y)
    losses.sum().backward()
    for k, net in enumerate(nets):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        torch.testing.assert_close(losses[k], loss, rtol=1e-5, atol=1e-5)
        grad = torch.cat([p.grad.flatten() for p in net.parameters()])
        torch.testing.assert_close(stacked.params.grad[k], grad, rtol=1e-4, atol=1e-5)
        for layer, bn in enumerate((net.bn1, net.bn2)):
            torch.testing.assert_close(stacked.running[layer, 0, k], bn.running_mean)
            torch.testing.assert_close(stacked.running[layer, 1, k], bn.running_var)
        net.eval()
        logits = stacked.forward(x, train=False)[k]
        torch.testing.assert_close(logits, net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_given_patch_moments_change_nothing(precision):
    """Losses, gradients and BN statistics are bit-identical whether the model computes the
    patch moments or is given :func:`patch_moments` of the batch (as the evaluator does)."""
    generator = torch.Generator().manual_seed(0)
    shape, classes = (3, 12, 12), 5
    x = torch.randn(8, *shape, generator=generator)
    y = torch.randint(0, classes, (8,), generator=generator)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    protocol = dataclasses.replace(get_protocol("quick"), precision=precision)
    x = x.to(dtype)
    outcomes = []
    for moments in (None, patch_moments(x)):
        stacked = StackedChild(init_child(shape, classes, seed=0), 2)
        with evaluator.autocast(protocol, x.device):
            losses = stacked.losses(x, y, moments)
        losses.sum().backward()
        outcomes.append((losses.detach(), stacked.params.grad, stacked.running))
    for computed, given in zip(*outcomes, strict=True):
        assert torch.equal(computed, given)


def test_epoch_moments_are_each_batchs_patch_moments(synthetic):
    protocol = get_protocol("quick")
    data = evaluator.prepared(synthetic, protocol, torch.device("cpu"))
    xs, _ = evaluator.shuffled_epoch(data, 3, 1, 200)
    moments = evaluator.epoch_moments(data, 3, 1, 200, 50)
    assert moments.shape[0] == 4
    for index, start in enumerate(range(0, 200, 50)):
        assert torch.equal(moments[index], patch_moments(xs[start : start + 50]))


def test_stacked_child_reset_restores_the_initialisation():
    stacked = StackedChild(init_child((1, 8, 8), 10, seed=0), 2)
    start = stacked.params.detach().clone()
    stacked.losses(torch.randn(4, 1, 8, 8), torch.arange(4)).sum().backward()
    with torch.no_grad():
        stacked.params.sub_(stacked.params.grad)
    stacked.reset()
    assert torch.equal(stacked.params, start) and stacked.params.grad is None


# --- one candidate -------------------------------------------------------------------------------


def test_evaluate_trains_and_is_deterministic(synthetic):
    first = evaluate(SGD, dataset=synthetic, protocol=TINY, seed=0)
    second = evaluate(SGD, dataset=synthetic, protocol=TINY, seed=0)
    assert first.status == "ok", first.message
    assert set(first.sweep) == set(TINY.learning_rates)
    assert first.best_lr == max(first.sweep, key=first.sweep.get)
    assert 0.1 < first.reward <= 1.0
    assert (first.reward, first.sweep) == (second.reward, second.sweep)
    assert first.protocol_hash == TINY.hash and first.key and first.dsl == SGD


def test_stochastic_and_decay_rules_are_deterministic(synthetic):
    for rule in (DROPOUT, POWERSIGN_LD):
        first = evaluate(rule, dataset=synthetic, protocol=TINY)
        second = evaluate(rule, dataset=synthetic, protocol=TINY)
        assert first.status == "ok", first.message
        assert (first.reward, first.sweep) == (second.reward, second.sweep)


def test_seed_changes_initialisation_and_order(synthetic):
    zero = evaluate(SGD, dataset=synthetic, protocol=TINY_FP32, seed=0)
    one = evaluate(SGD, dataset=synthetic, protocol=TINY_FP32, seed=1)
    assert zero.sweep != one.sweep


def test_memory_format_changes_layout_not_results(synthetic):
    channels_last = evaluate(SGD, dataset=synthetic, protocol=TINY_FP32)
    contiguous = dataclasses.replace(TINY_FP32, memory_format="contiguous")
    result = evaluate(SGD, dataset=synthetic, protocol=contiguous)
    assert result.best_lr == channels_last.best_lr
    assert math.isclose(result.reward, channels_last.reward, abs_tol=0.01)


def test_protocol_larger_than_the_data_set_is_an_error(synthetic):
    with pytest.raises(ValueError, match="only"):
        evaluate(SGD, dataset=synthetic, protocol=dataclasses.replace(TINY, sweep_examples=20_000))


def test_progress_is_reported_per_run(synthetic):
    calls = []
    evaluate(SGD, dataset=synthetic, protocol=TINY, progress=lambda *a: calls.append(a))
    total = len(TINY.learning_rates) + 1
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_rules_and_torch_optim_agree(synthetic):
    """The DSL's SGD through SymbolicOptimizer and torch.optim.SGD: the same update."""
    rule = evaluate(SGD, dataset=synthetic, protocol=TINY_FP32)
    optim = evaluate_baseline("sgd", dataset=synthetic, protocol=TINY_FP32)
    assert optim.key == "baseline:sgd"
    assert rule.best_lr == optim.best_lr
    for lr in TINY.learning_rates:
        assert math.isclose(rule.sweep[lr], optim.sweep[lr], abs_tol=0.01)


def test_degenerate_rule_is_not_trained(synthetic, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a degenerate rule must not be trained")

    monkeypatch.setattr(evaluator, "_train_and_score", no_training)
    result = evaluate("one one id id add", dataset=synthetic, protocol=TINY)
    assert (result.status, result.reward, result.best_lr) == ("degenerate", 0.0, None)


def test_exploding_rule_diverges(synthetic):
    result = evaluate(EXPLODES, dataset=synthetic, protocol=TINY)
    assert (result.status, result.reward, result.best_lr) == ("diverged", 0.0, None)
    assert result.sweep == {lr: 0.0 for lr in TINY.learning_rates}


class _Poison(torch.optim.Optimizer):
    """Writes ``value`` into the first parameter entry at every step."""

    def __init__(self, params, value: float):
        super().__init__(params, {})
        self.value = value

    @torch.no_grad()
    def step(self, closure=None):
        self.param_groups[0]["params"][0].view(-1)[0] = self.value


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_one_diverging_learning_rate_scores_zero(synthetic, value):
    def factory(params, lr, total_steps):
        return _Poison(params, value) if lr == 0.1 else torch.optim.SGD(params, lr=lr)

    result = evaluate_optimizer(factory, dsl="x", key="x", dataset=synthetic, protocol=TINY)
    assert result.status == "ok" and result.best_lr == 0.01
    assert result.sweep[0.1] == 0.0 and result.sweep[0.01] > 0.0


def test_diverged_final_run(synthetic):
    runs = []

    def factory(params, lr, total_steps):
        runs.append(total_steps)
        final = total_steps == TINY.final_steps(0)
        return _Poison(params, math.nan) if final else torch.optim.SGD(params, lr=lr)

    result = evaluate_optimizer(factory, dsl="x", key="x", dataset=synthetic, protocol=TINY)
    assert runs == [TINY.sweep_steps] * 2 + [TINY.final_steps(0)]
    assert (result.status, result.reward) == ("diverged", 0.0)
    assert "final run" in result.message


def test_candidate_failure_is_reported_not_raised(synthetic):
    def broken(params, lr, total_steps):
        raise RuntimeError("boom")

    result = evaluate_optimizer(broken, dsl="x", key="x", dataset=synthetic, protocol=TINY)
    assert (result.status, result.reward) == ("failed", 0.0)
    assert result.message == "RuntimeError: boom"
    unparsable = evaluate("g g nope id add", dataset=synthetic, protocol=TINY)
    assert unparsable.status == "failed" and "nope" in unparsable.message


# --- many candidates at once ---------------------------------------------------------------------


def test_batched_equals_single(synthetic):
    """Stacked training (chunks of 3 models, so a rule's runs straddle stacks) gives the single
    evaluator's results in fp32; NaNs of a diverging neighbour do not leak into the others."""
    rules = [SGD, ADAM, EXPLODES, "one one id id add", POWERSIGN_LD, "g g nope id add"]
    batched = evaluate_batch(
        rules, dataset=synthetic, protocol=TINY_FP32, device="cpu", max_models=3
    )
    for rule, together in zip(rules, batched, strict=True):
        alone = evaluate(rule, dataset=synthetic, protocol=TINY_FP32)
        assert (together.status, together.best_lr) == (alone.status, alone.best_lr), rule
        assert together.sweep.keys() == alone.sweep.keys()
        for lr, accuracy in alone.sweep.items():
            assert math.isclose(together.sweep[lr], accuracy, abs_tol=0.01), (rule, lr)
        assert math.isclose(together.reward, alone.reward, abs_tol=0.01), rule


def test_batched_isolates_a_failing_rule(synthetic, monkeypatch):
    real = evaluator.symbolic_update

    def fails_for_adam(*args, rule, **kwargs):
        if rule.dsl == ADAM:
            raise ValueError("adam broke")
        real(*args, rule=rule, **kwargs)

    monkeypatch.setattr(evaluator, "symbolic_update", fails_for_adam)
    calls = []
    sgd, adam = evaluate_batch(
        [SGD, ADAM],
        dataset=synthetic,
        protocol=TINY,
        device="cpu",
        progress=lambda *a: calls.append(a),
    )
    assert calls[-1] == (6, 6)  # 2 rules × (2 sweep runs + 1 final run), adam's final skipped
    assert sgd.status == "ok"
    assert (adam.status, adam.reward, adam.message) == ("failed", 0.0, "ValueError: adam broke")


# --- baselines -----------------------------------------------------------------------------------


def test_baselines_train(synthetic):
    for name in BASELINES:
        result = evaluate_baseline(name, dataset=synthetic, protocol=TINY)
        assert isinstance(result, EvalResult) and result.status == "ok", (name, result.message)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_baseline("lion", dataset=synthetic, protocol=TINY)


def test_baseline_table_rows(synthetic):
    (row,) = baseline_table(synthetic, TINY, seeds=(0, 1), names=["adam"])
    assert row["optimizer"] == "adam" and row["seeds"] == [0, 1]
    assert len(row["rewards"]) == 2 and row["std"] >= 0
    assert math.isclose(row["mean"], sum(row["rewards"]) / 2)


@pytest.mark.parametrize("name", [name for name, baseline in BASELINES.items() if baseline.dsl])
def test_a_baselines_rule_is_its_preset_and_takes_the_same_steps(name):
    baseline, steps = BASELINES[name], 6
    assert baseline.dsl == PRESETS[name]
    start = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = [start.clone().requires_grad_(), start.clone().requires_grad_()]
    optimizers = [
        baseline([params[0]], 0.01, steps),
        SymbolicOptimizer([params[1]], baseline.dsl, lr=0.01, total_steps=steps),
    ]
    for step in range(steps):
        for param, optimizer in zip(params, optimizers, strict=True):
            optimizer.zero_grad()
            (param - step).pow(2).sum().backward()
            optimizer.step()
    torch.testing.assert_close(params[0], params[1], rtol=1e-7, atol=1e-9)
