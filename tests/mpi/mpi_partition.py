# ranks: 1 2 3 4
"""A partitioned model computes what the whole model computes (model parallelism).

Every rank builds the whole model (same seed) and its own partition over COMM_WORLD;
the partition's logits, loss, number correct, evaluation and every gradient must equal
the whole model's, to float32 tolerance.  The models cover every layer type (fully
connected, locally connected, max pooling, LCN; softmax and one-vs-all outputs) with
sizes that no partition count here divides evenly, maps smaller than the tile grid
(partitions with empty tiles) and fewer classes than partitions.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpibelief.model import Model, image_stack
from mpibelief.partition import PartitionedModel

COMM = MPI.COMM_WORLD


def models():
    yield "mlp", Model(13, 7, 11, 2, "sigmoid")
    yield "mlp-3-classes", Model(9, 3, 5, 1, "tanh")
    yield "image", Model.of(image_stack((17, 15, 2), 5, 3, rf=4, strides=(1, 2),
                                        pools=(2, 1), lcn=3), (17, 15, 2))
    yield "image-logistic", Model.of(
        image_stack((13, 14, 1), 6, (2, 3), rf=3, strides=(1, 1), pools=(1, 3), lcn=5,
                    activation="sigmoid"), (13, 14, 1), "logistic")
    yield "image-tiny-map", Model.of(image_stack((7, 7, 2), 4, 2, rf=3, strides=(2,),
                                                 pools=(3,), lcn=1), (7, 7, 2))


def close(mine, whole, what):
    scale = max(1.0, float(np.max(np.abs(whole)))) if whole.size else 1.0
    np.testing.assert_allclose(mine, whole, rtol=2e-4, atol=2e-5 * scale,
                               err_msg=f"rank {COMM.rank}/{COMM.size}: {what}")


def check(name: str, model: Model) -> None:
    P, rng = COMM.size, np.random.default_rng(7)
    model.init(seed=3)
    part = PartitionedModel(model, COMM)
    ordered = model.to_layout(model.params, P)
    part.init(seed=3)  # drawn layer by layer, as the whole model draws them
    np.testing.assert_array_equal(part.params, ordered[part.lo:part.hi], err_msg=name)
    x = rng.standard_normal((6, model.n_inputs)).astype(np.float32)
    y = rng.integers(0, model.n_classes, 6).astype(np.int32)
    whole_logits = model.forward(x).copy()
    c0, c1 = part.classes
    close(part.forward(x), whole_logits[:, c0:c1], f"{name} logits")
    loss, correct = model.loss_and_grad(x, y)
    p_loss, p_correct = part.loss_and_grad(x, y)
    assert abs(p_loss - loss) <= 1e-5 * max(1.0, abs(loss)), (name, p_loss, loss)
    assert p_correct == correct, (name, p_correct, correct)
    close(part.grads, model.to_layout(model.grads, P)[part.lo:part.hi], f"{name} grads")
    assert np.any(part.grads != 0) or part.n_params == 0, name
    e_loss, e_acc = model.evaluate(x, y, batch=4)
    p_eloss, p_eacc = part.evaluate(x, y, batch=4)
    assert abs(p_eloss - e_loss) <= 1e-5 * max(1.0, abs(e_loss)) and p_eacc == e_acc, name
    alone = PartitionedModel(model, None, partitions=P, index=COMM.rank)  # no exchange
    alone.params[...] = part.params
    a_loss, _ = alone.loss_and_grad(x, y)  # runs without peers (halos stay zero)
    if P == 1:  # nothing crosses: alone is the whole model
        close(alone.grads, part.grads, f"{name} alone")
        assert abs(a_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    back = model.from_layout(ordered, P)
    np.testing.assert_array_equal(back, model.params, err_msg=f"{name} reorder")


for label, net in models():
    check(label, net)
COMM.Barrier()
if COMM.rank == 0:
    print(f"partitioned == whole on {COMM.size} rank(s)")
