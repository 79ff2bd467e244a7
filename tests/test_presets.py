"""The presets: each parses, is a distinct non-degenerate rule, and means the paper's formula.

The meaning check runs each preset with ``SymbolicOptimizer`` and compares with the paper's
formula written here in NumPy (Table 1's LaTeX). Rules with ``drop`` are random; they are
checked with every ``drop_p`` replaced by ``id`` on both sides, which checks everything else.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from nos_sym import SymbolicOptimizer, parse
from nos_sym.presets import DESCRIPTIONS, PRESETS, TABLE1, UnknownPresetError, preset

EPS = 1e-8
TOTAL_STEPS = 5


def clip(x: np.ndarray, bound: float) -> np.ndarray:
    return np.clip(x, -bound, bound)


def linear_decay(t: int) -> float:
    return 1 - min(t, TOTAL_STEPS) / TOTAL_STEPS


def cosine_decay(t: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(t, TOTAL_STEPS) / TOTAL_STEPS))


def restart_decay(t: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * ((20 * min(t, TOTAL_STEPS)) % TOTAL_STEPS) / TOTAL_STEPS))


DECAYS = {"ld": linear_decay, "cd": cosine_decay, "rd": restart_decay}


def powersign_decayed(decay):
    return lambda x: np.exp(decay(x.t) * x.s) * x.g


def addsign_decayed(decay):
    return lambda x: (1 + decay(x.t) * x.s) * x.g


# Δ(x) with x: g, m (m̂), v (v̂), gamma (γ̂), w, t (steps taken, from 0); drop(x, p) read as x.
FORMULAS = {
    "sgd": lambda x: x.g,
    "momentum": lambda x: x.m,
    "adam": lambda x: x.adam,
    "rmsprop": lambda x: x.rmsprop,
    "powersign": lambda x: np.exp(x.s) * x.g,
    **{f"powersign-{name}": powersign_decayed(decay) for name, decay in DECAYS.items()},
    "addsign": lambda x: (1 + x.s) * x.g,
    **{f"addsign-{name}": addsign_decayed(decay) for name, decay in DECAYS.items()},
    "powersign-plus-clip-g": lambda x: (np.exp(x.s) + clip(x.g, 1e-4)) * x.g,
    "clip-m-exp-v": lambda x: clip(x.m, 1e-4) * np.exp(x.v),
    "m-exp-v": lambda x: x.m * np.exp(x.v),
    "powersign-drop-0.3": lambda x: x.g * np.exp(x.s),
    "m-exp-g2": lambda x: x.m * np.exp(x.g**2),
    "drop-m-div-exp-g2": lambda x: x.m / (np.exp(x.g**2) + EPS),
    "powersign-drop-0.1": lambda x: x.g * np.exp(x.s),
    "clip-rmsprop-plus-drop-m": lambda x: clip(x.rmsprop, 1e-5) + x.m,
    "adam-powersign": lambda x: x.adam * np.exp(x.s),
    "adam-exp-m": lambda x: x.adam * np.exp(x.m),
    "g-plus-drop-m": lambda x: x.g + x.m,
    "drop-m-exp-g3": lambda x: x.m * np.exp(x.g**3),
    "g-minus-clip-g2": lambda x: x.g - clip(x.g**2, 1e-4),
    "exp-g-minus-exp-m": lambda x: np.exp(x.g) - np.exp(x.m),
    "drop-m-exp-w": lambda x: x.m * np.exp(1e-3 * x.w),
}


class Inputs:
    """The operands at one step, from the DSL's definitions (docs/dsl.md)."""

    def __init__(self, g, m, v, gamma, w, t) -> None:
        self.g, self.m, self.v, self.gamma, self.w, self.t = g, m, v, gamma, w, t
        self.s = np.sign(g) * np.sign(m)
        self.adam = m / (np.sqrt(v) + EPS)
        self.rmsprop = g / (np.sqrt(v) + EPS)


def reference(name: str, w0: np.ndarray, grads: list[np.ndarray], lr: float) -> np.ndarray:
    w = w0.copy()
    averages = {"m": np.zeros_like(w), "v": np.zeros_like(w), "gamma": np.zeros_like(w)}
    betas = {"m": 0.9, "v": 0.999, "gamma": 0.999}
    for t, g in enumerate(grads):
        for key, power in (("m", 1), ("v", 2), ("gamma", 3)):
            averages[key] = betas[key] * averages[key] + (1 - betas[key]) * g**power
        corrected = {k: a / (1 - betas[k] ** (t + 1)) for k, a in averages.items()}
        w = w - lr * FORMULAS[name](Inputs(g, w=w, t=t, **corrected))
    return w


def without_drop(dsl: str) -> str:
    return re.sub(r"\bdrop_0\.\d\b", "id", dsl)


def test_every_preset_has_a_formula_here() -> None:
    assert set(FORMULAS) == set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_means_the_papers_formula(name: str) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=7)
    grads = [0.7 * rng.normal(size=7) for _ in range(TOTAL_STEPS + 2)]  # past T: t is clamped
    w = torch.tensor(w0, requires_grad=True)
    optimizer = SymbolicOptimizer(
        [w], without_drop(PRESETS[name]), lr=0.01, total_steps=TOTAL_STEPS
    )
    for g in grads:
        w.grad = torch.tensor(g)
        optimizer.step()
    np.testing.assert_allclose(w.detach().numpy(), reference(name, w0, grads, 0.01), rtol=1e-12)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_to_a_live_rule(name: str) -> None:
    rule = parse(PRESETS[name])
    assert rule.dsl == PRESETS[name]  # written in the parser's normal spacing
    assert not rule.is_degenerate
    assert rule.stochastic == ("drop_" in PRESETS[name])
    assert rule.needs_total_steps == name.endswith(("-ld", "-cd", "-rd"))


def test_presets_are_distinct_rules() -> None:
    keys = {parse(dsl).key for dsl in PRESETS.values()}
    assert len(keys) == len(PRESETS)


@pytest.mark.parametrize(
    ("name", "equivalent"),
    [
        ("adam", "v g sqrt id keep ; m o1 id id div"),  # docs/dsl.md: the same update
        ("powersign", "sign_m sign_g id id mul ; g o1 id exp mul"),
        ("g-plus-drop-m", "m g drop_0.3 id add"),
    ],
)
def test_presets_match_equivalent_spellings(name: str, equivalent: str) -> None:
    assert parse(preset(name)) == parse(equivalent)


def test_table1_lists_the_sixteen_rules_in_order() -> None:
    assert len(TABLE1) == len(set(TABLE1)) == 16
    assert set(TABLE1) <= set(PRESETS)
    for number, name in enumerate(TABLE1, start=1):
        if name != "powersign":
            assert DESCRIPTIONS[name].startswith(f"Table 1 #{number}"), name
    assert "Table 1 #4" in DESCRIPTIONS["powersign"]


def test_descriptions_are_single_lines() -> None:
    assert set(DESCRIPTIONS) == set(PRESETS)
    for name, description in DESCRIPTIONS.items():
        assert description and "\n" not in description and "Δ =" in description, name


def test_unknown_preset_lists_the_names() -> None:
    assert preset("adam") == "m v id sqrt div"
    with pytest.raises(KeyError) as caught:
        preset("adamw")
    assert isinstance(caught.value, UnknownPresetError)
    message = str(caught.value)
    assert message.startswith("unknown preset 'adamw'; known presets: sgd, momentum, adam")
    assert "powersign-rd" in message
