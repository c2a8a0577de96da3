"""The model: layers are views of one flat vector, and its gradient is the true one."""

from __future__ import annotations

import numpy as np
import pytest

from mpibelief.model import Model
from mpibelief.optim import Optimizer


def tiny(activation: str = "tanh") -> Model:
    model = Model(n_inputs=6, n_classes=4, hidden=5, layers=2, activation=activation)
    model.init(seed=3)
    # Nonzero biases: with zero biases a sample whose layer-0 units are all dead puts
    # layer 1 exactly on relu's kink, where finite differences see half a slope.
    model.params += 0.1 * np.random.default_rng(4).standard_normal(model.n_params, np.float32)
    return model


def test_layers_view_the_flat_vector():
    model = tiny()
    assert model.n_params == (6 * 5 + 5) + (5 * 5 + 5) + (5 * 4 + 4)
    model.params[:] = 0.0
    assert all(np.all(layer.w == 0) for layer in model.layers)
    model.params[-1] = 7.0
    assert model.layers[-1].b[-1] == 7.0


def test_same_seed_same_model():
    assert np.array_equal(tiny().params, tiny().params)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_gradient_matches_finite_differences(activation):
    model = tiny(activation)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    y = rng.integers(0, 4, 7).astype(np.int32)
    model.loss_and_grad(x, y)
    analytic = model.grads.copy()
    h = 1e-3  # small enough to rarely cross a relu kink, large for float32 noise
    for i in rng.choice(model.n_params, 25, replace=False):
        keep = model.params[i]
        model.params[i] = keep + h
        plus, _ = model.loss_and_grad(x, y)
        model.params[i] = keep - h
        minus, _ = model.loss_and_grad(x, y)
        model.params[i] = keep
        assert analytic[i] == pytest.approx((plus - minus) / (2 * h), abs=2e-3, rel=5e-2)


def test_training_lowers_the_loss():
    model = tiny("relu")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
    opt = Optimizer("adagrad", lr=0.1)
    state = opt.state(model.n_params)
    first, _ = model.loss_and_grad(x, y)
    for _ in range(200):
        model.loss_and_grad(x, y)
        opt.apply(model.params, model.grads, state)
    last, correct = model.loss_and_grad(x, y)
    assert last < 0.5 * first and correct > 48


def test_evaluate_agrees_with_batches():
    model = tiny()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 4, 50).astype(np.int32)
    loss, acc = model.evaluate(x, y, batch=7)
    whole_loss, correct = model.loss_and_grad(x, y)
    assert loss == pytest.approx(whole_loss, rel=1e-5) and acc == correct / 50
