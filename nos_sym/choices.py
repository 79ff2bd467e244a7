"""The names a search config may choose (algorithms, search spaces, backends, data sets), without
importing what they name: a run's config is checked with them by ``nos-sym top`` and ``status``,
which start without torch. The implementations' tables (``algorithms.ALGORITHMS``,
``space.SPACES``) are keyed by the same names in the same order (a test checks it)."""

from __future__ import annotations

ALGORITHMS = ("trpo", "reinforce", "random", "evolution")
SPACES = ("paper", "paper-decay", "full", "small")
BACKENDS = ("inline", "process", "ray", "gpu")
DATASETS = ("fashion-mnist", "cifar10", "synthetic")
