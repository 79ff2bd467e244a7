r"""Named update rules in the DSL: the paper's optimizers, its Table 1 and the usual baselines.

``PRESETS`` maps a name to a DSL string (``docs/dsl.md``, :mod:`nos_sym.dsl`), ``DESCRIPTIONS``
the same name to a one-line description, and ``TABLE1`` lists, in the paper's order, the names of
the 16 rules that Neural Optimizer Search found and Table 1 of Bello et al. (ICML 2017) reports on
the Wide ResNet.
:func:`preset` looks a name up with an error that lists the known names; :func:`resolve` turns
a preset name, DSL text or a :class:`~nos_sym.Rule` into a ``Rule`` (what the optimizers accept).

Notation, as in the paper: :math:`s = \operatorname{sign}(g)\operatorname{sign}(\hat m)`,
:math:`\hat m, \hat v, \hat\gamma` the bias-corrected running averages of :math:`g, g^2, g^3`
(:math:`\beta_1 = 0.9`, :math:`\beta_2 = \beta_3 = 0.999`), ADAM :math:`= \hat m/(\sqrt{\hat v}
+ \epsilon)`, RMSProp :math:`= g/(\sqrt{\hat v} + \epsilon)`, and the update is
:math:`w \leftarrow w - \text{lr} \cdot \Delta`.

What the DSL cannot write, and is therefore not here:

- PowerSign with a base other than :math:`e` (e.g. the paper's base 2): :math:`2^{s} g =
  e^{s \log 2} g` needs the constant :math:`\log 2`, and the DSL has no constant but 1.
  :class:`nos_sym.sign_optim.PowerSign` takes any base.
- AddSign with :math:`\alpha \neq 1` (:class:`nos_sym.sign_optim.AddSign` takes any).
- Classical momentum (``buf = μ buf + g``): the DSL's ``m`` is the bias-corrected EMA
  :math:`\hat m_t = (1 - \beta_1) \, \text{buf}_t / (1 - \beta_1^t)` with :math:`\mu = \beta_1`,
  so the ``momentum`` preset equals SGD with momentum 0.9 at a learning rate
  :math:`(1 - \beta_1)/(1 - \beta_1^t)` times its own: give it 10 times the learning rate.
- ``torch.optim.RMSprop`` (:math:`\alpha = 0.99`, no bias correction): the ``rmsprop`` preset
  uses :math:`\hat v` (:math:`\beta_2 = 0.999`, bias-corrected).

The decayed variants (``-ld``, ``-cd``, ``-rd``) read t/T and need ``total_steps``. The DSL's
``ld``, ``cd``, ``rd`` are :func:`nos_sym.sign_decay.linear`, ``cosine(T, 0.5)`` and
``restart(T, 20)``, so that e.g. ``SymbolicOptimizer(p, preset("powersign-cd"), total_steps=T)``
and ``PowerSign(p, sign_decay=sign_decay.cosine(T))`` take the same steps.
"""

from __future__ import annotations

from nos_sym.dsl import DSLSyntaxError, Rule, as_rule

__all__ = ["DESCRIPTIONS", "PRESETS", "TABLE1", "UnknownPresetError", "preset", "resolve"]

_POWERSIGN = "sign_g sign_m id id mul ; o1 g exp id mul"
_ADDSIGN = "sign_g sign_m id id mul ; o1 one id id add ; o2 g id id mul"


def _powersign_decayed(decay: str) -> str:
    return f"sign_g sign_m id id mul ; o1 {decay} id id mul ; o2 g exp id mul"


def _addsign_decayed(decay: str) -> str:
    return f"sign_g sign_m id id mul ; o1 {decay} id id mul ; o2 one id id add ; o3 g id id mul"


_DECAY_NAMES = {"ld": "linear", "cd": "cosine", "rd": "restart"}

# (name, DSL, one-line description)
_RULES: tuple[tuple[str, str, str], ...] = (
    # ---- baselines
    ("sgd", "g g id id keep", "SGD: Δ = g."),
    (
        "momentum",
        "m m id id keep",
        "Momentum as the DSL writes it: Δ = m̂ (bias-corrected EMA, β1 = 0.9); use 10× the lr "
        "of SGD with momentum 0.9.",
    ),
    ("adam", "m v id sqrt div", "Adam: Δ = m̂ / (√v̂ + ε)."),
    ("rmsprop", "g v id sqrt div", "RMSProp: Δ = g / (√v̂ + ε), v̂ bias-corrected, β2 = 0.999."),
    # ---- the paper's PowerSign and AddSign, with their sign decays
    ("powersign", _POWERSIGN, "PowerSign (base e), Table 1 #4: Δ = e^{sign(g)·sign(m)}·g."),
    *(
        (
            f"powersign-{decay}",
            _powersign_decayed(decay),
            f"PowerSign, {_DECAY_NAMES[decay]} sign decay: Δ = e^{{{decay}·sign(g)·sign(m)}}·g.",
        )
        for decay in _DECAY_NAMES
    ),
    ("addsign", _ADDSIGN, "AddSign (α = 1): Δ = (1 + sign(g)·sign(m))·g."),
    *(
        (
            f"addsign-{decay}",
            _addsign_decayed(decay),
            f"AddSign, {_DECAY_NAMES[decay]} sign decay: Δ = (1 + {decay}·sign(g)·sign(m))·g.",
        )
        for decay in _DECAY_NAMES
    ),
    # ---- Table 1: the rules found by the search (PowerSign itself is row 4, above)
    (
        "powersign-plus-clip-g",
        "sign_g sign_m id id mul ; o1 g exp clip_1e-4 add ; o2 g id id mul",
        "Table 1 #1 (the paper's Optimizer_1): Δ = [e^{sign(g)·sign(m)} + clip(g, 1e-4)]·g.",
    ),
    ("clip-m-exp-v", "m v clip_1e-4 exp mul", "Table 1 #2: Δ = clip(m̂, 1e-4)·e^{v̂}."),
    ("m-exp-v", "m v id exp mul", "Table 1 #3: Δ = m̂·e^{v̂}."),
    (
        "powersign-drop-0.3",
        "sign_g sign_m id id mul ; o1 g exp drop_0.3 mul",
        "Table 1 #5: Δ = drop(g, 0.3)·e^{sign(g)·sign(m)}.",
    ),
    ("m-exp-g2", "m g2 id exp mul", "Table 1 #6: Δ = m̂·e^{g²}."),
    ("drop-m-div-exp-g2", "m g2 drop_0.1 exp div", "Table 1 #7: Δ = drop(m̂, 0.1)/(e^{g²} + ε)."),
    (
        "powersign-drop-0.1",
        "sign_g sign_m id id mul ; o1 g exp drop_0.1 mul",
        "Table 1 #8: Δ = drop(g, 0.1)·e^{sign(g)·sign(m)}.",
    ),
    (
        "clip-rmsprop-plus-drop-m",
        "rmsprop m clip_1e-5 drop_0.3 add",
        "Table 1 #9: Δ = clip(RMSProp, 1e-5) + drop(m̂, 0.3).",
    ),
    (
        "adam-powersign",
        "sign_g sign_m id id mul ; o1 adam exp id mul",
        "Table 1 #10: Δ = ADAM·e^{sign(g)·sign(m)}.",
    ),
    ("adam-exp-m", "adam m id exp mul", "Table 1 #11: Δ = ADAM·e^{m̂}."),
    ("g-plus-drop-m", "g m id drop_0.3 add", "Table 1 #12: Δ = g + drop(m̂, 0.3)."),
    ("drop-m-exp-g3", "m g3 drop_0.1 exp mul", "Table 1 #13: Δ = drop(m̂, 0.1)·e^{g³}."),
    ("g-minus-clip-g2", "g g2 id clip_1e-4 sub", "Table 1 #14: Δ = g − clip(g², 1e-4)."),
    ("exp-g-minus-exp-m", "g m exp exp sub", "Table 1 #15: Δ = e^g − e^{m̂}."),
    (
        "drop-m-exp-w",
        "m w_1e-3 drop_0.3 exp mul",
        "Table 1 #16 (the paper's Optimizer_2): Δ = drop(m̂, 0.3)·e^{10⁻³w}.",
    ),
)

PRESETS: dict[str, str] = {name: dsl for name, dsl, _ in _RULES}
"""Preset name → DSL string."""

DESCRIPTIONS: dict[str, str] = {name: description for name, _, description in _RULES}
"""Preset name → one-line description with the rule's math."""

TABLE1: tuple[str, ...] = (
    "powersign-plus-clip-g",
    "clip-m-exp-v",
    "m-exp-v",
    "powersign",
    "powersign-drop-0.3",
    "m-exp-g2",
    "drop-m-div-exp-g2",
    "powersign-drop-0.1",
    "clip-rmsprop-plus-drop-m",
    "adam-powersign",
    "adam-exp-m",
    "g-plus-drop-m",
    "drop-m-exp-g3",
    "g-minus-clip-g2",
    "exp-g-minus-exp-m",
    "drop-m-exp-w",
)
"""The 16 rules of the paper's Table 1 (below its 4 baselines), in the paper's order."""


class UnknownPresetError(KeyError):
    """Raised by :func:`preset` for a name that is not in :data:`PRESETS`."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def preset(name: str) -> str:
    """The DSL string of the preset ``name`` (a key of :data:`PRESETS`).

    Raises:
        UnknownPresetError: a ``KeyError`` whose message lists the known names.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None


def resolve(rule: Rule | str) -> Rule:
    """A :class:`~nos_sym.Rule` from a ``Rule``, a preset name (a key of :data:`PRESETS`) or DSL
    text, in that order.

    Raises:
        DSLSyntaxError: text that is neither a preset name nor a DSL rule; the message ends with
            the known preset names.
    """
    if isinstance(rule, str) and rule in PRESETS:
        return as_rule(PRESETS[rule])
    try:
        return as_rule(rule)
    except DSLSyntaxError as error:
        raise DSLSyntaxError(
            f"{error.message} ({rule!r} is neither a DSL rule nor a preset; known presets: "
            f"{', '.join(PRESETS)})",
            line=error.line,
            column=error.column,
            text=error.text,
        ) from None
