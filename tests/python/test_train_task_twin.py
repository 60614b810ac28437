"""train_task_twin.py rebuilds `moe train`'s batches: its evaluation batch, routed by a run's
checkpoint, gives the run's regime_expert.csv count for count; its targets give the run's
initial loss (the zero head's MSE); and the last training batch, through the checkpoint and
its head, gives about the run's last training loss (one Adam step later)."""
import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import moe
from train_task_twin import RegimeTask

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))

pytestmark = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")


def test_twin_rebuilds_the_runs_batches(tmp_path):
    out = tmp_path / "run"
    steps, T, Te = 40, 128, 512
    r = subprocess.run([MOE, "train", "--steps", str(steps), "--batch", str(T), "--eval-tokens",
                        str(Te), "--seed", "3", "--threads", "1", "--out", str(out), "--json",
                        "--no-plots"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    task = RegimeTask()

    x, y, regime = task.eval_batch(Te)
    assert float((y.astype(np.float64) ** 2).mean()) == pytest.approx(summary["initial_loss"],
                                                                       rel=2e-6)
    m = moe.MoE.from_checkpoint(str(out / "model.safetensors"))
    m.forward(x, training=False)
    counts = np.zeros((8, 8), np.int64)
    np.add.at(counts, (np.repeat(regime, 2), m.routing.indices.ravel()), 1)
    with open(out / "regime_expert.csv") as f:
        ref = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    np.testing.assert_array_equal(counts, ref)

    tensors = moe.load_safetensors(str(out / "model.safetensors"))[0]
    xb, yb, _ = task.batch(T, steps - 1)
    h = m.forward(xb, step=steps - 1)
    mse = float(((h @ tensors["head.W"] + tensors["head.b"] - yb) ** 2).mean())
    with open(out / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert mse == pytest.approx(float(last["loss"]), rel=0.1)
