"""The shared warmstart: single-replica SGD on the simulated clock, before the others.

The paper's Figure 4 runs all start "from the same ~10 h warmstart of single-replica
SGD" (6.7% accuracy when they branch off).  Here one replica trains the config's model
alone, on the whole training set, for ``steps`` mini-batches with the config's
optimiser (the real kernels and update rule, in place, as ``algorithms/sgd.py``
does), and each step is placed on a simulated clock::

    seconds per step = batch * compute_per_sample + n_params * apply_per_param

the same two costs a simulated Downpour replica and shard pay for computing and
applying a gradient, with no network: SGD [1] holds its parameters.  Every ``every``
simulated seconds (and at the end) the parameters are evaluated, so the warmstart has
its own curve, drawn before the methods branch off.  The result is the parameter
vector every method of a campaign starts from, its SHA-256 (a campaign recomputing
the warmstart checks it got the same one), its simulated length and its curve.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mpibelief.errors import UserError


@dataclass
class Warmstart:
    """What the methods start from.

    Attributes:
        params: float32 parameters after the last step.
        seconds: simulated seconds it took (where every method's clock starts).
        steps, samples: mini-batches and frames trained on.
        metrics: ``/metrics`` columns (``wall_seconds`` simulated) of its evaluations.
    """

    params: np.ndarray
    seconds: float
    steps: int
    samples: int
    metrics: dict

    @property
    def sha256(self) -> str:
        return digest(self.params)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["test_accuracy"][-1])


def digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, np.float32).tobytes()).hexdigest()


def warmstart(cfg, data, costs, steps: int, every: float, evaluate=None) -> Warmstart:
    """Train ``steps`` mini-batches of single-replica SGD; see the module docstring.

    Args:
        cfg: the config (model, ``train`` batch, optimiser and rate, ``run.seed``).
        costs: a :class:`~mpibelief.simulate.cluster.Costs` (compute and apply).
        every: simulated seconds between evaluations.
        evaluate: an :class:`~mpibelief.coordinator.Evaluator` (default: the config's).
    """
    from mpibelief.coordinator import Evaluator
    from mpibelief.data import batches
    from mpibelief.model import Model
    from mpibelief.optim import Optimizer

    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    opt = Optimizer.from_config(cfg.train)
    state = opt.state(model.n_params)
    evaluate = evaluate or Evaluator(data, cfg.train.eval_samples, cfg.run.seed)
    order = batches(len(data.y_train), cfg.train.batch, np.random.default_rng(cfg.run.seed + 1))
    step_seconds = (cfg.train.batch * costs.compute_per_sample
                    + model.n_params * costs.apply_per_param)
    rows, now, due = [], 0.0, 0.0
    for step in range(steps + 1):
        if now >= due or step == steps:
            rows.append({"wall_seconds": now, "samples": step * cfg.train.batch,
                         "updates": step, **evaluate(model)})
            due = now + every
        if step == steps:
            break
        idx = next(order)
        model.loss_and_grad(data.x_train[idx], data.y_train[idx])
        if not opt.apply(model.params, model.grads, state):
            raise UserError(f"warmstart diverged at step {step + 1}: try a smaller train.lr")
        now += step_seconds
    metrics = {key: np.array([r[key] for r in rows]) for key in rows[0]}
    return Warmstart(model.params.copy(), now, steps, steps * cfg.train.batch, metrics)
