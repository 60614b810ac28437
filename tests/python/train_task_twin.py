"""A Python twin of `moe train`'s task (cli/train_task.cpp): the same SplitMix64 streams, the
same centres, teachers and target standardisation, so that any batch of a run (training
batch b, the evaluation batch) can be rebuilt outside the CLI and a run's checkpoint probed
on it (docs/training.md did so to check the balancing loss's gradients at the trained
state). Pure Python for the draws, so slow-ish: the constructor draws the 8192-token
calibration batch (a few seconds). test_train_task_twin.py checks it against the CLI."""
import math

import numpy as np

_M = (1 << 64) - 1
STREAM_TASK = (1 << 63) + 1
STREAM_CALIB = (1 << 63) + 2
STREAM_EVAL = (1 << 63) + 3


class Rng:
    """train_task.cpp's Rng: SplitMix64 seeded by (seed, stream), Box–Muller normals."""

    def __init__(self, seed, stream):
        self.s = seed
        self.s = (self.next() + stream) & _M
        self.s = self.next()

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & _M
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
        return z ^ (z >> 31)

    def uniform(self):
        return (self.next() >> 11) * 2.0 ** -53

    def normal(self):
        u1 = 1.0 - self.uniform()
        u2 = self.uniform()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2)

    def below(self, n):
        return self.next() % n


class RegimeTask:
    """The default task of `moe train` (--regimes, --d-model, --teacher-hidden, --d-target,
    --center-scale, --spread, --task-seed)."""

    def __init__(self, regimes=8, d_in=32, hidden=32, d_out=8, center_scale=1.0, spread=1.0,
                 seed=7):
        R, d, H, Do = regimes, d_in, hidden, d_out
        self.regimes, self.d_in, self.spread, self.seed = R, d, spread, seed
        r = Rng(seed, STREAM_TASK)
        f32 = np.float32
        self.centers = np.array([f32(center_scale * r.normal()) for _ in range(R * d)],
                                f32).reshape(R, d)
        sa = 1.5 / math.sqrt(d * (spread * spread + 1e-12))
        self.A = np.array([f32(sa * r.normal()) for _ in range(R * d * H)], f32).reshape(R, d, H)
        self.B = np.array([f32(r.normal() / math.sqrt(H)) for _ in range(R * H * Do)],
                          f32).reshape(R, H, Do)
        self.a = np.zeros((R, H), f32)
        for g in range(R):
            for h in range(H):
                acc = float(np.dot(self.centers[g].astype(np.float64),
                                   self.A[g, :, h].astype(np.float64)))
                self.a[g, h] = f32(-acc + 0.5 * r.normal())
        self.y_mean, self.y_scale = 0.0, 1.0
        x, regime = self.inputs(8192, STREAM_CALIB)
        y = self.teacher(x, regime).astype(np.float64)
        self.y_mean = y.mean()
        self.y_scale = 1.0 / math.sqrt(max((y * y).mean() - self.y_mean ** 2, 1e-12))

    def inputs(self, T, stream):
        """x (T, d_in) float32 and the regimes (T,) of batch `stream`."""
        r = Rng(self.seed, stream)
        x = np.empty((T, self.d_in), np.float32)
        regime = np.empty(T, np.int32)
        for t in range(T):
            g = r.below(self.regimes)
            regime[t] = g
            c = self.centers[g]
            for i in range(self.d_in):
                x[t, i] = np.float32(float(c[i]) + self.spread * r.normal())
        return x, regime

    def teacher(self, x, regime):
        """The standardised targets (T, d_out) of inputs x from the given regimes."""
        pre = np.einsum("ti,tih->th", x.astype(np.float64), self.A[regime].astype(np.float64))
        z = np.tanh(pre + self.a[regime]).astype(np.float32).astype(np.float64)
        y = np.einsum("th,thc->tc", z, self.B[regime].astype(np.float64))
        return ((y - self.y_mean) * self.y_scale).astype(np.float32)

    def batch(self, T, b):
        """Training batch b (step b + 1 of a run): x, y, regimes."""
        x, regime = self.inputs(T, b)
        return x, self.teacher(x, regime), regime

    def eval_batch(self, T):
        x, regime = self.inputs(T, STREAM_EVAL)
        return x, self.teacher(x, regime), regime
