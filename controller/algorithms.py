"""Training the controller: TRPO (the paper's choice), REINFORCE and the random-search control.

Every algorithm has the same life cycle, built for an asynchronous runner:

    samples = algorithm.sample(batch)          # records log π_old(τ) of every string
    ... evaluate samples.dsl, possibly while newer batches are sampled ...
    stats = algorithm.update(samples, rewards)  # any batch, even one sampled by an older policy

Policy-gradient updates share (paper, sections 3.2 and 4.2):

* the reward baseline b, an exponential moving average of rewards updated once per reward,
  b ← d·b + (1 − d)·R with d = :data:`BASELINE_DECAY` = 0.95, starting at the first batch's mean;
  a batch's advantages A_i = R_i − b use b as it was before that batch;
* the importance-weighted surrogate with the paper's entropy bonus β = 0.0015,

      L(θ) = mean_i [ exp(log π_θ(τ_i) − log π_old(τ_i)) · A_i ] + β · mean_i H_θ(τ_i),

  where log π_old(τ_i) is the log-probability recorded when τ_i was sampled and H_θ(τ_i) the
  entropy along τ_i. For a batch sampled by the current policy ∇L is the REINFORCE gradient
  mean_i A_i ∇log π_θ(τ_i); for a stale batch the ratio corrects for the policy having moved.

The controller's tensors are tiny (a batch of strings × 150 units), so ``sample`` and ``update``
run single-threaded (torch's thread count is set to 1 for the call and restored after): on a
loaded 2-core machine a second intra-op thread made every small op wait for a descheduled
worker, ~1000× slower (see ``benchmarks/bench_controller.py``).

``state_dict()`` holds only tensors, numbers, strings, lists and dicts (model, optimizer, baseline,
the torch generator's state, counters), so ``torch.save`` / ``torch.load(weights_only=True)``
round-trips it, and a loaded algorithm samples exactly what the saved one would have.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from nos_sym.controller.policy import Policy, Samples, entropy_of, kl_divergence
from nos_sym.controller.space import SearchSpace, get_space, size, uniform_sample_indices

BASELINE_DECAY = 0.95
ENTROPY_COEFFICIENT = 0.0015
BATCH_SIZE = 5
REINFORCE_LEARNING_RATE = 1e-5
MAX_KL = 0.01
CG_DAMPING = 0.1
CG_ITERATIONS = 10
LINE_SEARCH_STEPS = 10
ACCEPT_RATIO = 0.1


class EMABaseline:
    """b ← d·b + (1 − d)·R for every reward R in order; b starts at the first batch's mean."""

    def __init__(self, decay: float = BASELINE_DECAY):
        self.decay = decay
        self.value: float | None = None

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """A_i = R_i − b with b as it stood before this batch, then b absorbs the batch."""
        if self.value is None:
            self.value = float(rewards.mean())
        advantages = rewards - self.value
        for reward in rewards.tolist():
            self.value = self.decay * self.value + (1.0 - self.decay) * reward
        return advantages

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.value = state["decay"], state["value"]


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one intra-op thread inside the block (the previous count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def checked_rewards(samples: Samples, rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Rewards as a float tensor ``[len(samples)]``; raises ``ValueError`` on a wrong shape or a
    non-finite reward (a failed evaluation must be given a finite reward by the caller)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().reshape(-1)
    if len(samples) == 0 or rewards.shape[0] != len(samples):
        raise ValueError(f"{rewards.shape[0]} rewards for {len(samples)} samples")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    return rewards


class Algorithm(ABC):
    """Samples rules of ``space`` and learns from their rewards; deterministic given ``seed``."""

    name: str

    def __init__(self, space: SearchSpace, seed: int, batch_size: int = BATCH_SIZE):
        self.space = space
        self.seed = seed
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def sample(self, batch: int | None = None) -> Samples:
        """``batch`` rules (default :attr:`batch_size`) with their sampling log-probabilities."""
        batch = self.batch_size if batch is None else batch
        if batch < 1:
            raise ValueError(f"a batch needs at least one sample, got {batch}")
        with single_threaded():
            return self._sample(batch)

    def update(self, samples: Samples, rewards: torch.Tensor | Sequence[float]) -> dict:
        """Learn from the rewards of ``samples`` (sampled by this algorithm, any time before);
        returns statistics (name → float). Raises ``ValueError`` on non-finite rewards."""
        rewards = checked_rewards(samples, rewards)
        self.updates += 1
        stats = {
            "updates": self.updates,
            "reward_mean": float(rewards.mean()),
            "reward_max": float(rewards.max()),
        }
        with single_threaded():
            return stats | self._update(samples, rewards)

    @abstractmethod
    def _sample(self, batch: int) -> Samples: ...

    @abstractmethod
    def _update(self, samples: Samples, rewards: torch.Tensor) -> dict: ...

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (see the module docstring)."""
        return {
            "algorithm": self.name,
            "space_hash": self.space.hash,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["algorithm"] != self.name or state["space_hash"] != self.space.hash:
            raise ValueError(
                f"state of {state['algorithm']!r} on space {state['space_hash'][:12]} cannot be "
                f"loaded into {self.name!r} on space {self.space.hash[:12]}"
            )
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.updates = state["updates"]


class RandomSearch(Algorithm):
    """The control: rules drawn exactly uniformly over the space's valid strings; no learning.
    log π_old(τ) = −log |space| and the entropy is log |space| for every sample."""

    name = "random"

    def _sample(self, batch: int) -> Samples:
        tokens = uniform_sample_indices(self.space, batch, self.generator)
        dsl = [self.space.to_dsl(self.space.decode(row)) for row in tokens]
        log_size = math.log(size(self.space))
        return Samples(tokens, dsl, torch.full((batch,), -log_size), torch.full((batch,), log_size))

    def _update(self, samples: Samples, rewards: torch.Tensor) -> dict:
        return {}


class PolicyGradient(Algorithm):
    """What REINFORCE and TRPO share: the LSTM policy, the EMA baseline and the surrogate."""

    def __init__(
        self,
        space: SearchSpace,
        seed: int,
        batch_size: int = BATCH_SIZE,
        entropy_coefficient: float = ENTROPY_COEFFICIENT,
        baseline_decay: float = BASELINE_DECAY,
    ):
        super().__init__(space, seed, batch_size)
        self.policy = Policy(space, self.generator)
        self.baseline = EMABaseline(baseline_decay)
        self.entropy_coefficient = entropy_coefficient

    def _sample(self, batch: int) -> Samples:
        return self.policy.sample(batch, self.generator)

    def surrogate(
        self, samples: Samples, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L(θ) of the module docstring, and the per-position log π_θ it was computed from."""
        log_pi = self.policy.distributions(samples.tokens)
        log_probs = log_pi.gather(2, samples.tokens[:, :, None]).sum(dim=(1, 2))
        ratio = torch.exp(log_probs - samples.log_probs)
        entropy = entropy_of(log_pi).sum(dim=1)
        return (ratio * advantages).mean() + self.entropy_coefficient * entropy.mean(), log_pi

    def _advantages(self, samples: Samples, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        advantages = self.baseline.advantages(rewards)
        stats = {
            "baseline": self.baseline.value,
            "advantage_abs_mean": float(advantages.abs().mean()),
            "entropy": float(samples.entropies.mean()),
        }
        return advantages, stats

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "policy": self.policy.state_dict(),
            "baseline": self.baseline.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state["policy"])
        self.baseline.load_state_dict(state["baseline"])


class REINFORCE(PolicyGradient):
    """Policy gradient (Williams 1992) as in the paper: Adam (lr 1e-5) on −L(θ), one step per
    batch (minibatch 5). θ ← Adam(θ, −∇L(θ))."""

    name = "reinforce"

    def __init__(
        self,
        space: SearchSpace,
        seed: int,
        learning_rate: float = REINFORCE_LEARNING_RATE,
        **common,
    ):
        super().__init__(space, seed, **common)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=learning_rate)

    def _update(self, samples: Samples, rewards: torch.Tensor) -> dict:
        advantages, stats = self._advantages(samples, rewards)
        objective, _ = self.surrogate(samples, advantages)
        self.optimizer.zero_grad()
        (-objective).backward()
        self.optimizer.step()
        return stats | {"surrogate": float(objective.detach())}

    def state_dict(self) -> dict:
        return super().state_dict() | {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])


def conjugate_gradient(
    matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int
) -> torch.Tensor:
    """x ≈ A⁻¹b for a symmetric positive-definite A given as x ↦ Ax, starting from x = 0."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_norm = residual @ residual
    for _ in range(iterations):
        if residual_norm < 1e-10:
            break
        product = matrix_vector(direction)
        step = residual_norm / (direction @ product)
        x += step * direction
        residual -= step * product
        new_norm = residual @ residual
        direction = residual + (new_norm / residual_norm) * direction
        residual_norm = new_norm
    return x


class TRPO(PolicyGradient):
    """Trust Region Policy Optimization (Schulman et al. 2015) on the surrogate L(θ).

    With θ_k the current parameters, D̄(θ) = mean_i Σ_p KL(π_θk(·|a_<p) ‖ π_θ(·|a_<p)) over the
    batch's strings and g = ∇L(θ_k), one update is

        F = ∇²D̄(θ_k) + λI                   (Fisher-vector products by double backprop)
        x ≈ F⁻¹g                             (conjugate gradient, :data:`CG_ITERATIONS` steps)
        s = √(2δ / xᵀFx) · x                 (the step that reaches D̄ = δ on the quadratic model)
        θ_{k+1} = θ_k + 2⁻ʲ s                for the first j = 0 … :data:`LINE_SEARCH_STEPS` − 1
                                             with D̄ ≤ δ, L improved and by at least
                                             :data:`ACCEPT_RATIO` of its linear prediction 2⁻ʲ gᵀs;
                                             θ_{k+1} = θ_k if none qualifies.

    δ = :data:`MAX_KL` = 0.01, λ = :data:`CG_DAMPING` = 0.1. The trust region is around θ_k;
    the importance ratio in L uses the sampling-time log-probabilities, so stale batches are
    weighted correctly.
    """

    name = "trpo"

    def __init__(
        self,
        space: SearchSpace,
        seed: int,
        max_kl: float = MAX_KL,
        damping: float = CG_DAMPING,
        **common,
    ):
        super().__init__(space, seed, **common)
        self.max_kl = max_kl
        self.damping = damping

    def _flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.policy.parameters()])

    def _set_parameters(self, flat: torch.Tensor) -> None:
        torch.nn.utils.vector_to_parameters(flat, self.policy.parameters())

    @staticmethod
    def _mean_kl(old_log_pi: torch.Tensor, new_log_pi: torch.Tensor) -> torch.Tensor:
        """D̄: the KL summed over a string's positions, averaged over the batch."""
        return kl_divergence(old_log_pi, new_log_pi).sum(dim=1).mean()

    def _fisher_vector_product(
        self, tokens: torch.Tensor, old_log_pi: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        parameters = list(self.policy.parameters())
        mean_kl = self._mean_kl(old_log_pi, self.policy.distributions(tokens))
        kl_gradient = torch.autograd.grad(mean_kl, parameters, create_graph=True)
        flat_gradient = torch.cat([g.reshape(-1) for g in kl_gradient])

        def product(vector: torch.Tensor) -> torch.Tensor:
            hessian_vector = torch.autograd.grad(
                flat_gradient @ vector, parameters, retain_graph=True
            )
            return torch.cat([h.reshape(-1) for h in hessian_vector]) + self.damping * vector

        return product

    def _update(self, samples: Samples, rewards: torch.Tensor) -> dict:
        advantages, stats = self._advantages(samples, rewards)
        parameters = list(self.policy.parameters())
        objective, log_pi = self.surrogate(samples, advantages)
        gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, parameters)])
        old_log_pi, objective = log_pi.detach(), float(objective.detach())
        fisher = self._fisher_vector_product(samples.tokens, old_log_pi)
        direction = conjugate_gradient(fisher, gradient, CG_ITERATIONS)
        curvature = float(direction @ fisher(direction))
        stats |= {
            "surrogate": objective,
            "kl": 0.0,
            "step_fraction": 0.0,
            "improvement": 0.0,
        }
        if not (math.isfinite(curvature) and curvature > 0):
            return stats
        step = math.sqrt(2 * self.max_kl / curvature) * direction
        expected = float(gradient @ step)  # gᵀF⁻¹g > 0 unless g ≈ 0 or CG went astray
        if not expected > 0:
            return stats
        start = self._flat_parameters()
        for j in range(LINE_SEARCH_STEPS):
            fraction = 0.5**j
            self._set_parameters(start + fraction * step)
            with torch.no_grad():
                new_objective, new_log_pi = self.surrogate(samples, advantages)
                kl = float(self._mean_kl(old_log_pi, new_log_pi))
            improvement = float(new_objective) - objective
            if kl <= self.max_kl and improvement > ACCEPT_RATIO * fraction * expected:
                return stats | {
                    "surrogate": float(new_objective),
                    "kl": kl,
                    "step_fraction": fraction,
                    "improvement": improvement,
                }
        self._set_parameters(start)
        return stats


# Imported here, not at the top: evolution.py subclasses Algorithm, defined above.
from nos_sym.controller.evolution import RegularizedEvolution  # noqa: E402

ALGORITHMS: dict[str, type[Algorithm]] = {
    algorithm.name: algorithm for algorithm in (TRPO, REINFORCE, RandomSearch, RegularizedEvolution)
}


def make_algorithm(name: str, space: SearchSpace | str, seed: int, **hyperparameters) -> Algorithm:
    """``"trpo"`` (default of the search), ``"reinforce"``, ``"random"`` or ``"evolution"`` on
    ``space`` (a :class:`SearchSpace` or a preset name); ``hyperparameters`` go to the
    constructor (e.g. ``population=50, tournament=10`` for evolution)."""
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}: expected one of {', '.join(ALGORITHMS)}")
    if isinstance(space, str):
        space = get_space(space)
    return ALGORITHMS[name](space, seed, **hyperparameters)


__all__ = [
    "ALGORITHMS",
    "REINFORCE",
    "TRPO",
    "Algorithm",
    "EMABaseline",
    "PolicyGradient",
    "RandomSearch",
    "conjugate_gradient",
    "make_algorithm",
]
