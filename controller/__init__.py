"""The controller of Neural Optimizer Search: search spaces, the LSTM policy and its training.

* :mod:`.space`: :class:`SearchSpace`, the presets :data:`SPACES`, masks, :func:`size`,
  :func:`uniform_sample`.
* :mod:`.policy`: :class:`Policy` (the paper's LSTM controller) and :class:`Samples`.
* :mod:`.algorithms`: :class:`TRPO`, :class:`REINFORCE`, :class:`RandomSearch` and
  :func:`make_algorithm`.
* :mod:`.search`: :class:`~.search.SearchRun`, the dedup-aware run loop (``nos-sym search``).
* :mod:`.backends`: where candidates train (inline, process, Ray, GPU): the ``Backend`` protocol.
* :mod:`.rundir`: a run directory's files (``SearchConfig``, sample log, checkpoint) and the
  readers of a run (``leaderboard``, ``status``, ``steps``).
* :mod:`.evolution`: :class:`RegularizedEvolution` (aging evolution, ``"evolution"``).
* :mod:`.funnel`: the successive-halving funnel of a search (``--rungs``): rung costs, ASHA.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ALGORITHMS": "algorithms",
    "REINFORCE": "algorithms",
    "TRPO": "algorithms",
    "Algorithm": "algorithms",
    "RandomSearch": "algorithms",
    "make_algorithm": "algorithms",
    "RegularizedEvolution": "evolution",
    "Policy": "policy",
    "Samples": "policy",
    "SPACES": "space",
    "SearchSpace": "space",
    "get_space": "space",
    "size": "space",
    "uniform_sample": "space",
    "uniform_sample_indices": "space",
}
"""Name → its module; imported on first use (PEP 562), so the light readers of a run
(``nos_sym.controller.rundir`` for ``nos-sym top``/``status``) start without torch."""

if TYPE_CHECKING:
    from nos_sym.controller.algorithms import (
        ALGORITHMS,
        REINFORCE,
        TRPO,
        Algorithm,
        RandomSearch,
        make_algorithm,
    )
    from nos_sym.controller.evolution import RegularizedEvolution
    from nos_sym.controller.policy import Policy, Samples
    from nos_sym.controller.space import (
        SPACES,
        SearchSpace,
        get_space,
        size,
        uniform_sample,
        uniform_sample_indices,
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"nos_sym.controller.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'nos_sym.controller' has no attribute {name!r}")


__all__ = [
    "ALGORITHMS",
    "REINFORCE",
    "SPACES",
    "TRPO",
    "Algorithm",
    "Policy",
    "RandomSearch",
    "RegularizedEvolution",
    "Samples",
    "SearchSpace",
    "get_space",
    "make_algorithm",
    "size",
    "uniform_sample",
    "uniform_sample_indices",
]
