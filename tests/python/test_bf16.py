"""precision="bf16" (SPEC §6) from Python: the forward against a NumPy oracle that rounds the
weights and each product's input activations to bf16 (round to nearest even) and sums in
float64 — tight — and against the fp32 layer within bf16 tolerance; gradients against the
fp32 layer; the bf16 copies following assignments and training; checkpoints recording the
precision; the same results when oneDNN is held to other ISAs. (The C++ suite checks every
gradient against the float64 reference twin on the same rounded operands.)"""
import json
import os
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest

import moe
from precision_oracle import CASES, pair, rounded_oracle


def bf16(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def oracle(m, x):
    """y from the routing of the last forward, experts in float64 on bf16-rounded inputs."""
    return rounded_oracle(m, x, bf16, bf16)


@pytest.mark.parametrize("expert,activation,E,k,T", CASES)
def test_bf16_matches_the_rounding_oracle_and_fp32(expert, activation, E, k, T):
    rng = np.random.default_rng(E * 100 + T)
    d, f = 34, 75  # sizes off every vector width
    m32, m16 = pair("bf16", d, E, k, expert=expert, d_ff=f, activation=activation,
                    noise="none", router_init_std=0.5, seed=E + T)
    assert m16.config["precision"] == "bf16" and m32.config["precision"] == "fp32"
    x = rng.standard_normal((T, d)).astype(np.float32)
    y32 = m32.forward(x, training=False)
    y16 = m16.forward(x, training=False)
    np.testing.assert_array_equal(m16.routing.indices, m32.routing.indices)  # fp32 router
    ref = oracle(m16, x)
    scale = np.abs(ref).max() + 1e-6
    # Same rounded operands, fp32 accumulation vs float64 (SPEC §6's bound: 1e-3).
    assert np.abs(y16 - ref).max() / scale < 1e-3
    # Against fp32: the error of rounding weights and activations to 8 significant bits.
    rel = np.linalg.norm(y16 - y32) / (np.linalg.norm(y32) + 1e-12)
    assert 0 < rel < 2e-2, rel


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_bf16_gradients_are_close_to_fp32(expert):
    rng = np.random.default_rng(3)
    m32, m16 = pair("bf16", 40, 6, 2, expert=expert, d_ff=72, activation="gelu",
                    noise="learned", router_init_std=0.5, capacity_factor=1.25, seed=4)
    x = rng.standard_normal((64, 40)).astype(np.float32)
    dy = rng.standard_normal((64, 40)).astype(np.float32)
    for m in (m32, m16):
        m.forward(x, step=2)
    dx32, dx16 = m32.backward(dy), m16.backward(dy)
    assert np.linalg.norm(dx16 - dx32) / np.linalg.norm(dx32) < 2e-2
    g32, g16 = m32.grads, m16.grads
    assert set(g32) == set(g16)
    for name in g32:
        n = np.linalg.norm(g32[name])
        if n > 0:
            assert np.linalg.norm(g16[name] - g32[name]) / n < 2e-2, name


def test_assignments_and_training_reach_the_bf16_copies():
    m = moe.MoE(8, 4, 2, noise="none", router_init_std=0.5, precision="bf16")
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    y_before = m.forward(x, training=False)
    m.W2 = m.W2 * 2  # the copies are made again at the next forward
    y_after = m.forward(x, training=False)
    assert not np.array_equal(y_after, y_before)
    # An optimizer step (after backward) is seen by the next forward.
    opt = moe.Adam(m, lr=0.05)
    m.forward(x)
    m.backward(np.ones((5, 8), dtype=np.float32))
    opt.step()
    assert not np.array_equal(m.forward(x, training=False), y_after)


def test_checkpoint_records_the_precision(tmp_path):
    m = moe.MoE(8, 4, 2, precision="bf16", seed=3)
    path = tmp_path / "m.safetensors"
    m.save(str(path))
    m2 = moe.MoE(8, 4, 2, precision="bf16")
    m2.load(str(path))
    x = np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)
    np.testing.assert_array_equal(m2.forward(x, training=False), m.forward(x, training=False))
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header["__metadata__"]
    assert any('"precision":"bf16"' in str(v).replace(" ", "") for v in meta.values()), meta


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        moe.MoE(8, 4, 2, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        moe.MoE(8, 4, 2, precision="int8", d_ff=1 << 17)


ISA_SCRIPT = """
import json, sys
import numpy as np
import moe
m = moe.MoE(48, 6, 2, expert="swiglu", d_ff=80, noise="none", router_init_std=0.5, seed=9,
            precision="bf16")
x = np.random.default_rng(0).standard_normal((30, 48)).astype(np.float32)
y = m.forward(x)
dx = m.backward(np.ones_like(y))
print(json.dumps({"info": moe.cpu_info(), "y": y.tolist(), "dx": dx.tolist()}))
"""


def run_with_isa(env_extra):
    env = dict(os.environ)
    env.pop("MOE_MAX_ISA", None)
    env.pop("MOE_AMX_EMULATE", None)
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", ISA_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_kernel_level_gives_the_same_results_to_bf16_tolerance():
    """Every level this CPU can run (MOE_MAX_ISA, which also holds oneDNN) and the AMX kernels
    on their emulation (MOE_AMX_EMULATE=1): the same products to bf16 tolerance, each level
    naming the kernel it ran."""
    base = run_with_isa({})
    y0, dx0 = np.array(base["y"]), np.array(base["dx"])
    best = base["info"]["best"]
    assert base["info"]["level"] == best, base["info"]
    order = ["avx2", "avx512", "avx512_bf16", "amx"]
    runs = [({"MOE_MAX_ISA": lv}, lv) for lv in order[:order.index(best) + 1]]
    runs.append(({"MOE_AMX_EMULATE": "1"}, best))
    for env, level in runs:
        got = run_with_isa(env)
        info = got["info"]
        assert info["level"] == level, (env, info)
        if env.get("MOE_AMX_EMULATE"):
            assert info["bf16_experts"].startswith("packed:amx_bf16 emulated"), info
        elif level in ("avx2", "avx512"):  # no vdpbf16ps: the packed products widen to fp32
            assert info["bf16_experts"].startswith("packed:widened"), info
        elif level == "avx512_bf16":
            assert info["bf16_experts"].startswith("packed:avx512_bf16"), info
        y, dx = np.array(got["y"]), np.array(got["dx"])
        assert np.abs(y - y0).max() / np.abs(y0).max() < 1e-3, (env, info)
        assert np.abs(dx - dx0).max() / np.abs(dx0).max() < 5e-3, (env, info)


def test_an_unknown_level_is_refused_by_name():
    env = dict(os.environ, MOE_MAX_ISA="avx512bf16")
    r = subprocess.run([sys.executable, "-c", "import moe; moe.cpu_info()"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "MOE_MAX_ISA: 'avx512bf16' is not a level; accepted: avx2, avx512, avx512_bf16, amx" \
        in r.stderr, r.stderr[-2000:]
