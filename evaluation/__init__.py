"""Scoring candidate update rules: train the child network under a protocol, remember rewards.

* :mod:`.outcome`: :class:`EvalResult`, the one outcome type (status, reward, sweep, ...).
* :mod:`.protocol`: :class:`Protocol` (learning-rate sweep, epochs, examples) and
  :data:`PROTOCOLS`.
* :mod:`.datasets`: loading and downloading the datasets (:data:`DATASETS`).
* :mod:`.data`: the training data prepared on the device, and its caches.
* :mod:`.child`: the child ConvNet and its stacked form.
* :mod:`.evaluator`: :func:`evaluate`, :func:`evaluate_batch`, :func:`evaluate_optimizer`.
* :mod:`.baselines`: the standard optimizers, scored the same way.
* :mod:`.store`: the SQLite reward store shared by workers.
* :mod:`.commands`: ``nos-sym evaluate``.
"""

from nos_sym.evaluation.outcome import STATUSES, EvalResult, Status

__all__ = ["STATUSES", "EvalResult", "Status"]
