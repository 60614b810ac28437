"""precision "int4", "mxfp4", "fp8" (SPEC §6, evaluation only) from Python: the quantizers of
mxfp4 and fp8 against NumPy quantizers written here from the formats' definitions (OCP MX
v1.0; DeepSeek-V3's 128×128 block scales) — the same values, exactly; libmoe's int4 on its
grid and within its documented error; the forward against a NumPy oracle on the values the
layer holds (exact rows: within what rounding a product's rows to int8 or bf16 costs), on
every kernel level; checkpoints; moe.torch.MoE; training refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import moe
from precision_oracle import rel, rounded_oracle

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def nearest(v, values):
    """Nearest of the ascending non-negative `values` (codes 0, 1, ...) to each |v|, saturated
    at the largest, ties to the even code; v's sign kept."""
    a = np.minimum(np.abs(v), values[-1])
    i = np.clip(np.searchsorted(values, a), 1, len(values) - 1)  # values[i-1] < a <= values[i]
    lo, hi = values[i - 1], values[i]
    pick_lo = (a - lo < hi - a) | ((a - lo == hi - a) & ((i - 1) % 2 == 0))
    return np.sign(v) * np.where(pick_lo, lo, hi)


def e2m1_round(v):
    """Nearest E2M1 value of each v (|v| saturated at 6), ties to the even code."""
    return nearest(v, E2M1)


def mxfp4_numpy(W):
    """W (K, N) → its MXFP4 values: per column and 32 rows, scale 2^(floor(log2 amax) − 2)."""
    K, N = W.shape
    out = np.zeros_like(W, dtype=np.float64)
    for b in range(0, K, 32):
        blk = W[b:b + 32].astype(np.float64)
        amax = np.abs(blk).max(axis=0)
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, 0)
        s = 2.0 ** e
        out[b:b + 32] = e2m1_round(blk / s) * s
    return out


def e4m3_values():
    v = []
    for c in range(127):  # the positive finite codes, ascending
        e, m = c >> 3, c & 7
        v.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(v)


E4M3 = e4m3_values()


def e4m3_round(v):
    """Nearest E4M3 value of each v (|v| saturated at 448), ties to the even code."""
    return nearest(v, E4M3)


def fp8_numpy(W):
    """W (K, N) → its FP8 values: per 128 × 128 block, scale max|w| / 448 (fp32)."""
    K, N = W.shape
    out = np.zeros_like(W, dtype=np.float64)
    for k0 in range(0, K, 128):
        for j0 in range(0, N, 128):
            blk = W[k0:k0 + 128, j0:j0 + 128]
            amax = np.float32(np.abs(blk).max())
            s = np.float32(amax / np.float32(448)) if amax > 0 else np.float32(1)
            q = e4m3_round((blk / s).astype(np.float32).astype(np.float64))
            out[k0:k0 + 128, j0:j0 + 128] = q * np.float64(s)
    return out


def layer(precision, expert="swiglu", T=None, **kw):
    return moe.MoE(96, 4, 2, expert=expert, d_ff=160, noise="none", router_init_std=0.5,
                   precision=precision, seed=3, activation="gelu" if expert == "mlp" else "relu",
                   **kw)


@pytest.mark.parametrize("precision,numpy_quantizer", [("mxfp4", mxfp4_numpy),
                                                       ("fp8", fp8_numpy)])
def test_stored_formats_quantize_as_their_definitions(precision, numpy_quantizer):
    m = layer(precision, expert="mlp")
    rng = np.random.default_rng(1)
    W1 = (rng.standard_normal(m.W1.shape) * rng.uniform(0.01, 3, (1, 1, m.W1.shape[2]))).astype(np.float32)
    m.W1 = W1
    m.drop_masters()
    held = m.expert_matrix("W1")
    for e in range(W1.shape[0]):
        np.testing.assert_array_equal(held[e], numpy_quantizer(W1[e]).astype(np.float32))


@pytest.mark.parametrize("group,zero_points", [(32, False), (128, False), (64, True)])
def test_int4_values_lie_on_their_grid(group, zero_points):
    m = layer("int4", expert="mlp", int4_group=group, int4_zero_points=zero_points)
    assert m.config["int4_group"] == group and m.config["int4_zero_points"] == zero_points
    W1 = np.asarray(m.W1, dtype=np.float64)
    m.drop_masters()
    held = np.asarray(m.expert_matrix("W1"), dtype=np.float64)
    E, K, N = held.shape
    for e in range(E):
        for g in range(0, K, group):
            blk = held[e, g:g + group]  # (rows, N): per column at most 16 distinct values,
            for j in range(N):          # evenly spaced (one fp16 scale)
                u = np.unique(blk[:, j])
                assert len(u) <= 16
                if len(u) > 2:
                    steps = np.diff(u)
                    step = steps.min()
                    assert np.allclose(steps / step, np.rint(steps / step), atol=1e-3)
    err = np.linalg.norm(held - W1) / np.linalg.norm(W1)
    assert 0 < err < 0.12  # docs/quant.md: 8–10% on these weights' kind


def exact_rows(v):
    return np.asarray(v, dtype=np.float64)


@pytest.mark.parametrize("precision", ["int4", "mxfp4", "fp8"])
@pytest.mark.parametrize("expert,T", [("swiglu", 1), ("swiglu", 5), ("mlp", 64),
                                      ("linear_relu", 9)])
def test_forward_matches_the_oracle_on_the_held_values(precision, expert, T):
    m = layer(precision, expert=expert)
    m32 = layer("fp32", expert=expert)
    for name in ("W_g", "W1", "W2", "W3", "b1", "b2"):
        if hasattr(m32, name):
            setattr(m32, name, getattr(m, name))
    x = np.random.default_rng(T).standard_normal((T, 96)).astype(np.float32)
    y32 = m32.forward(x, training=False)
    m.drop_masters()
    y = m.forward(x, training=False)
    np.testing.assert_array_equal(np.asarray(m.routing.indices), np.asarray(m32.routing.indices))

    class Held:  # the oracle reads the held values where it reads parameters
        def __init__(self, m):
            self.m = m

        def __getattr__(self, name):
            if name in ("W1", "W2", "W3"):
                return self.m.expert_matrix(name)
            return getattr(self.m, name)

    want = rounded_oracle(Held(m), x, exact_rows, exact_rows)
    assert np.count_nonzero(want) > want.size // 2
    # Rows rounded to int8 per 32 or 128 values (4-bit decode on VNNI: 128 on the tiled
    # matrices of int4 g128 and of mxfp4 with VBMI) or to bf16 cost up to ~1.6e-2 (the tight
    # checks, rows rounded as the kernel rounds them, are test_pretrained_formats.py's).
    assert rel(y, want) < 2e-2
    assert 1e-4 < rel(y, y32) < (0.06 if precision == "fp8" else 0.3)


def test_training_refused_and_evaluation_by_default():
    for p in ("int4", "mxfp4", "fp8"):
        m = layer(p)
        x = np.ones((2, 96), np.float32)
        with pytest.raises(ValueError, match=f"precision: '{p}' is for evaluation only"):
            m.forward(x, training=True)
        y = m.forward(x)  # evaluates by default
        with pytest.raises(ValueError, match="precision"):
            m.backward(np.ones_like(y))


def test_checkpoint_round_trip(tmp_path):
    for p in ("int4", "mxfp4", "fp8"):
        m = layer(p, int4_zero_points=True) if p == "int4" else layer(p)
        x = np.random.default_rng(2).standard_normal((7, 96)).astype(np.float32)
        y = m.forward(x, training=False)
        path = tmp_path / f"{p}.safetensors"
        m.save(path)
        tensors, meta = moe.load_safetensors(path)
        assert {"W1.codes", "W1.scales", "W2.codes", "W3.codes"} <= set(tensors), set(tensors)
        assert tensors["W1.codes"].dtype == np.float32  # U8 read exactly as floats
        assert json.loads(meta["moe_config"])["precision"] == p
        assert set(json.loads(meta["moe_lowbit_layout"])) == {"W1", "W2", "W3"}
        back = layer(p, int4_zero_points=True) if p == "int4" else layer(p)
        back.load(path)
        np.testing.assert_array_equal(back.forward(x, training=False), y)


def test_torch_module_evaluates_low_bit():
    torch = pytest.importorskip("torch")
    import moe.torch as mt
    mod = mt.MoE(96, 4, 2, expert="swiglu", d_ff=160, precision="int4", noise="none",
                 router_init_std=0.5, seed=3)
    mod.eval()
    x = torch.randn(6, 96)
    with torch.no_grad():
        y = mod(x)
    assert y.shape == (6, 96) and torch.isfinite(y).all()


PORTABLE_SCRIPT = r"""
import json, numpy as np, moe
out = {"info": moe.cpu_info()}
for p in ("int4", "mxfp4", "fp8"):
    for T in (3, 40):
        m = moe.MoE(96, 4, 2, expert="swiglu", d_ff=160, noise="none", router_init_std=0.5,
                    precision=p, seed=3)
        x = np.random.default_rng(T).standard_normal((T, 96)).astype(np.float32)
        out[f"{p}-{T}"] = m.forward(x, training=False).tolist()
print(json.dumps(out))
"""


def run_with(env_extra):
    env = dict(os.environ)
    env.pop("MOE_MAX_ISA", None)
    env.pop("MOE_AMX_EMULATE", None)
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_kernel_level_agrees():
    """Each level's kernels (their own row rounding: int8 rows on VNNI, bf16 rows, fp32 rows on
    AVX2) against this CPU's best, within what that rounding costs; cpu_info names them."""
    base = run_with({})
    assert set(base["info"]["lowbit_kernels"]) == {"int4", "mxfp4", "fp8"}
    prefill = {k: v.split("; prefill ")[1] for k, v in base["info"]["lowbit_kernels"].items()}
    if base["info"]["int8_kernel"] == "avx512_vnni":  # VNNI below AMX: 4-bit prefill in int8
        assert "int8 panels" in prefill["int4"] and "int8 panels" in prefill["mxfp4"], prefill
    assert "bf16 panels" in prefill["fp8"], prefill
    if moe.cpu_info()["level"] in ("avx512_bf16", "amx"):
        # On AMX (here its emulation) every prefill widens into bf16 panels for the tiles.
        amx = run_with({"MOE_AMX_EMULATE": "1"})
        assert all("bf16 panels for packed:amx_bf16" in v.split("; prefill ")[1]
                   for v in amx["info"]["lowbit_kernels"].values()), amx["info"]["lowbit_kernels"]
        for key in base:
            if key != "info":
                a, b = np.array(base[key]), np.array(amx[key])
                assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a), ("amx", key)
    for level in ("avx2", "avx512", "avx512_bf16"):
        got = run_with({"MOE_MAX_ISA": level})
        names = got["info"]["lowbit_kernels"]
        if level == "avx2":
            assert all(":avx2" in v for v in names.values()), names
        for key in base:
            if key == "info":
                continue
            a, b = np.array(base[key]), np.array(got[key])
            assert np.count_nonzero(a) > a.size // 2
            # int8 rows per 32 values (VNNI) against fp32 or bf16 rows: ~1e-2 of the output (1.1% seen)
            assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a), (level, key)


def test_bench_low_bit_rows():
    """`moe bench --precision bf16,int4,mxfp4,fp8 --config B3-T1 --quick`: a row per precision,
    the low-bit ones beside the memory roof of their own bytes, their goals listed."""
    exe = os.environ.get("MOE_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "build",
                                                 "bin", "moe"))
    r = subprocess.run([exe, "bench", "--quick", "--no-peer", "--repeat", "1", "--json",
                        "--precision", "bf16,int4,mxfp4,fp8", "--config", "B3-T1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    precs = [row["precision"] for row in rows]
    assert precs == ["bf16", "int4", "mxfp4", "fp8"], precs
    by = {row["precision"]: row for row in rows}
    # The bytes each row's memory roof reads: 4-bit formats about a quarter of bf16's.
    assert by["int4"]["selected_weight_bytes"] < 0.3 * by["bf16"]["selected_weight_bytes"]
    assert by["fp8"]["selected_weight_bytes"] < 0.52 * by["bf16"]["selected_weight_bytes"]
    assert "int4 B3-T1 decode >= 3x faster than bf16 decode" in r.stderr + r.stdout
