"""Scoring candidate update rules: train the paper's child network and memoize the reward.

A rule's reward is the held-out accuracy of a small ConvNet trained with it (Bello et al. 2017,
section 4.2): a learning-rate sweep, then a longer run at the best rate,

    reward = accuracy_valid(train(lr*, final run)),
    lr*    = argmax_lr accuracy_valid(train(lr, sweep run)).

* :mod:`.datasets`: the data sets (look-up, checksummed download, validation split);
  :mod:`.data`: their preparation for training and its caches.
* :mod:`.child`: the child network (:class:`ChildNet`, the stacked :class:`StackedChild`).
* :mod:`.protocol`: :class:`Protocol`, everything that can change a reward, and :data:`PROTOCOLS`.
* :mod:`.evaluator`: :func:`evaluate`, :func:`evaluate_batch`, :func:`evaluate_optimizer`;
  :mod:`.outcome`: :class:`EvalResult`, the one outcome type.
* :mod:`.store`: :class:`RewardStore`, the SQLite reward store with claims and leases;
  :mod:`.memoized`: :func:`evaluate_memoized`, one evaluation answered from it or trained once.
* :mod:`.calibrate`: how well a cheap protocol ranks rules against an expensive one.
* :mod:`.baselines`: the standard optimizers scored the same way.
* :mod:`.commands`: ``nos-sym evaluate``, ``nos-sym calibrate``.

See ``docs/evaluation.md`` and ``docs/store.md``.
"""

from nos_sym.evaluation.outcome import STATUSES, EvalResult, Status

__all__ = ["STATUSES", "EvalResult", "Status"]
