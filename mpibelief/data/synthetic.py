"""Synthetic classification: a fixed random teacher network labels Gaussian inputs.

Used for timing-only runs and tests, where any size and any number of classes is
needed, quickly and without files.  The teacher is a one-hidden-layer tanh network
whose output biases are tuned so that every class gets about the same share of
inputs; labels are the argmax of its logits, so a student network can in principle
learn the task exactly, but only by finding the teacher's nonlinear hidden features
(a linear model gets much less).

Images: with ``image_shape = [H, W, C]`` the inputs are images of that shape, flattened
in NHWC order (``n_inputs`` is then ``H*W*C``); the teacher is the same, so an image
network has a task it can learn, while timing runs get inputs of the paper's shape.
The teacher's hidden width and its balancing sample shrink for wide inputs so that
100x100x3 images cost megabytes, not gigabytes, on every rank.

Everything is deterministic from ``cfg.seed``: the teacher, the training inputs and the
test inputs come from three independent streams of one ``SeedSequence``, so changing
``n_train`` changes neither the teacher nor the test set.
"""

from __future__ import annotations

import numpy as np

from mpibelief.config import DataConfig
from mpibelief.data import Dataset
from mpibelief.errors import DataError

# Teacher size and input gain, chosen by training a 440-512-512-50 student on the
# default 20,000 samples: with 8 hidden units it reaches about 47% test accuracy in six
# epochs against 35% for a linear least-squares fit (chance 2%); wider or higher-gain
# teachers are learnt much more slowly, and 4 units cannot give 50 classes a share each.
TEACHER_HIDDEN = 8
TEACHER_GAIN = 1.0
# Samples and rounds used to balance the classes by shifting the output biases.
BALANCE_SAMPLES = 20000
BALANCE_ROUNDS = 100
# Float64 values a teacher matrix (and the balancing sample) may hold: bounds memory.
TEACHER_BUDGET = 2_000_000


def teacher_hidden(n_classes: int, n_inputs: int = 0) -> int:
    """Hidden units of the teacher: 8, or more when many classes need room to be
    balanced, but never so many that ``n_inputs x hidden`` passes the budget."""
    cap = TEACHER_BUDGET // n_inputs if n_inputs else n_classes
    return max(TEACHER_HIDDEN, min(n_classes // 6, cap))


class Teacher:
    """A random ``n_inputs -> hidden (tanh) -> n_classes`` network that labels inputs."""

    def __init__(self, rng: np.random.Generator, n_inputs: int, n_classes: int):
        hidden = teacher_hidden(n_classes, n_inputs)
        self.w1 = rng.standard_normal((n_inputs, hidden)) * (TEACHER_GAIN / np.sqrt(n_inputs))
        self.b1 = rng.standard_normal(hidden) * 0.5
        w2 = rng.standard_normal((hidden, n_classes))
        # Equal column norms give every class the same logit variance, a first step
        # towards balance; the biases do the rest.
        self.w2 = w2 / np.linalg.norm(w2, axis=0)
        self.b2 = np.zeros(n_classes)
        samples = min(BALANCE_SAMPLES, max(500, 20 * TEACHER_BUDGET // max(n_inputs, n_classes)))
        self._balance(rng.standard_normal((samples, n_inputs)))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Teacher outputs, float64 ``(N, n_classes)``."""
        return np.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def labels(self, x: np.ndarray) -> np.ndarray:
        """Argmax labels, int32 ``(N,)``; computed in blocks to bound memory."""
        out = np.empty(len(x), np.int32)
        block = min(65536, max(1, 2**24 // self.w2.shape[1]))  # at most 128 MiB of logits
        for start in range(0, len(x), block):
            out[start : start + block] = self.logits(x[start : start + block]).argmax(1)
        return out

    def _balance(self, x: np.ndarray) -> None:
        """Shift output biases until the classes have roughly equal frequencies.

        A random teacher otherwise gives some classes a tiny region of input space,
        which makes accuracy numbers hard to compare across class counts.  Each round
        lowers the bias of over-represented classes and raises the rest, in log space.
        """
        hidden = np.tanh(x @ self.w1 + self.b1) @ self.w2
        n_classes = self.w2.shape[1]
        target = len(x) / n_classes
        for _ in range(BALANCE_ROUNDS):
            counts = np.bincount((hidden + self.b2).argmax(1), minlength=n_classes)
            if counts.min() > 0.9 * target and counts.max() < 1.1 * target:
                break
            self.b2 -= 0.1 * np.log((counts + 1.0) / target)


def load_synthetic(cfg: DataConfig) -> Dataset:
    """A teacher-labelled Gaussian dataset of the sizes given in ``cfg``.

    Raises:
        DataError: a size that cannot make a dataset (no rows, inputs or classes).
    """
    for key, low in (("n_train", 1), ("n_test", 1), ("n_inputs", 1), ("n_classes", 2)):
        if getattr(cfg, key) < low:
            raise DataError(f"synthetic data needs data.{key} >= {low}, got {getattr(cfg, key)}")
    n_inputs = synthetic_inputs(cfg)
    teacher_seq, train_seq, test_seq = np.random.SeedSequence(cfg.seed).spawn(3)
    teacher = Teacher(np.random.default_rng(teacher_seq), n_inputs, cfg.n_classes)
    splits = []
    for seq, n in ((train_seq, cfg.n_train), (test_seq, cfg.n_test)):
        x = np.random.default_rng(seq).standard_normal((n, n_inputs), dtype=np.float32)
        splits += [x, teacher.labels(x)]
    info = {
        "seed": cfg.seed,
        "teacher_hidden": teacher_hidden(cfg.n_classes, n_inputs),
        "teacher_gain": TEACHER_GAIN,
        "image_shape": "x".join(map(str, cfg.image_shape)) or "none",
    }
    return Dataset(*splits, n_classes=cfg.n_classes, name="synthetic", info=info)


def synthetic_inputs(cfg: DataConfig) -> int:
    """Input width: ``H*W*C`` of ``image_shape`` when given, else ``n_inputs``."""
    return int(np.prod(cfg.image_shape)) if cfg.image_shape else cfg.n_inputs
