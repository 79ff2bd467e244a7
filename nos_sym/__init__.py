"""nos_sym: Neural Optimizer Search with a symbolic update-rule DSL.

The names below are imported on first use (PEP 562), so ``import nos_sym`` and the CLI's
``parse``/``tree``/``top``/``status`` pay for torch and matplotlib only where they use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AddSign": "nos_sym.sign_optim",
    "PowerSign": "nos_sym.sign_optim",
    "SymbolicOptimizer": "nos_sym.symbolic_optim",
    "symbolic_update": "nos_sym.symbolic_optim",
    "CANONICAL_VERSION": "nos_sym.dsl",
    "DSLSyntaxError": "nos_sym.dsl",
    "Rule": "nos_sym.dsl",
    "parse": "nos_sym.dsl",
    "draw_tree": "nos_sym.render",
    "evaluate": "nos_sym.api",
    "search": "nos_sym.api",
}
_MODULES = ("presets", "schedules", "sign_decay", "tasks")

if TYPE_CHECKING:
    from nos_sym import presets, schedules, sign_decay, tasks
    from nos_sym.api import evaluate, search
    from nos_sym.dsl import CANONICAL_VERSION, DSLSyntaxError, Rule, parse
    from nos_sym.render import draw_tree
    from nos_sym.sign_optim import AddSign, PowerSign
    from nos_sym.symbolic_optim import SymbolicOptimizer, symbolic_update


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"nos_sym.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nos_sym' has no attribute {name!r}")


__all__ = [
    "AddSign",
    "PowerSign",
    "presets",
    "schedules",
    "sign_decay",
    "CANONICAL_VERSION",
    "DSLSyntaxError",
    "Rule",
    "SymbolicOptimizer",
    "draw_tree",
    "evaluate",
    "parse",
    "search",
    "tasks",
    "symbolic_update",
]
