"""libmoe's low-bit formats against independent readings of each format's published definition.

The C++ test QuantOracle.WriteCases (tests/cpp/test_quant.cpp) writes, for GPTQ (v1 and v2
zero points, act-order), AWQ, MXFP4, FP8 and libmoe's own int4, the arrays exactly as the
checkpoints store them, what libmoe read from them (the dequantized weights through its kernel
layout, float64) and a decode product. Here the same bytes are read again:
- GPTQ and AWQ with NumPy, written from AutoGPTQ's and AutoAWQ's definitions (no PyPI package
  dequantizes them on CPU without a GPU build);
- MXFP4 with transformers' own convert_moe_packed_tensors (what GPT-OSS loads with);
- FP8 with torch's float8_e4m3fn;
- libmoe's int4 from the layout docs/quant.md describes.
The dequantized weights must agree bit for bit, the products (on the rows as libmoe's decode
path rounded them) to 1e-3 of their largest entry.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "build" / "bin" / "moe_tests"

pytestmark = pytest.mark.skipif(not TESTS.exists(), reason="build/bin/moe_tests not built")

SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_oracle")
    env = dict(os.environ, MOE_QUANT_ORACLE_DIR=str(root))
    r = subprocess.run([str(TESTS), "--gtest_filter=QuantOracle.WriteCases"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[  PASSED  ] 1 test" in r.stdout
    out = []
    for d in sorted(root.iterdir(), key=lambda p: int(p.name.split("_")[0])):
        meta = dict(line.split(" ", 1) for line in (d / "meta.txt").read_text().splitlines() if line)
        out.append((d, {k: (v if k == "kind" else int(v)) for k, v in meta.items()}))
    kinds = {m["kind"] for _, m in out}
    assert kinds == {"gptq", "awq", "mxfp4", "fp8", "int4"}, kinds
    return out


def raw(d, name, dtype):
    return np.fromfile(d / f"{name}.bin", dtype=dtype)


def gptq_dequant(d, K, N, v1):
    """AutoGPTQ's dequantization (qlinear_cuda_old), in NumPy."""
    qweight = raw(d, "qweight", "<u4").reshape(K // 8, 1, N)
    q = ((qweight >> SHIFTS.reshape(1, 8, 1)) & 15).reshape(K, N).astype(np.int64)
    qzeros = raw(d, "qzeros", "<u4").reshape(-1, N // 8, 1)
    z = ((qzeros >> SHIFTS.reshape(1, 1, 8)) & 15).reshape(-1, N).astype(np.int64)
    if v1:
        z = (z + 1) & 15  # stored z - 1
    s = raw(d, "scales", "<f2").reshape(-1, N).astype(np.float64)
    g = raw(d, "g_idx", "<i4")
    return (q - z[g]) * s[g]


def awq_dequant(d, K, N, group):
    """AutoAWQ's unpack_awq + reverse_awq_order + dequantize_gemm, in NumPy."""
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    def unpack(words, rows):
        nib = (words.reshape(rows, N // 8, 1) >> SHIFTS) & 15  # nibble positions 0..7
        return nib[:, :, reverse].reshape(rows, N).astype(np.int64)
    q = unpack(raw(d, "qweight", "<u4"), K)
    G = -(-K // group)
    z = unpack(raw(d, "qzeros", "<u4"), G)
    s = raw(d, "scales", "<f2").reshape(G, N).astype(np.float64)
    g = np.arange(K) // group
    return (q - z[g]) * s[g]


def mxfp4_dequant(d, K, N):
    torch = pytest.importorskip("torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    nb = -(-K // 32)
    blocks = torch.from_numpy(raw(d, "blocks", "u1").reshape(1, N, nb, 16).copy())
    scales = torch.from_numpy(raw(d, "scales", "u1").reshape(1, N, nb).copy())
    out = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (1, K, N)
    return out[0, :K].double().numpy()


def fp8_dequant(d, K, N):
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(raw(d, "weight", "u1").reshape(N, K).copy()).view(torch.float8_e4m3fn)
    s = raw(d, "scale_inv", "<f4").reshape(-(-N // 128), -(-K // 128)).astype(np.float64)
    s_full = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:N, :K]
    return (w.to(torch.float64).numpy() * s_full).T


def int4_dequant(d, K, N, group):
    """libmoe's own layout as docs/quant.md states it."""
    Kg = -(-K // group) * group
    codes = raw(d, "codes", "u1").reshape(N, Kg // 2)
    q = np.empty((N, Kg), dtype=np.int64)
    q[:, 0::2] = codes & 15
    q[:, 1::2] = codes >> 4
    s = raw(d, "scales", "<f2").reshape(N, -1).astype(np.float64)
    z = raw(d, "zeros", "u1").reshape(N, -1).astype(np.int64)
    g = np.arange(K) // group
    return ((q[:, :K] - z[:, g]) * s[:, g]).T


def dequant(d, m):
    K, N = m["K"], m["N"]
    kind = m["kind"]
    if kind == "gptq":
        return gptq_dequant(d, K, N, m["v1"])
    if kind == "awq":
        return awq_dequant(d, K, N, m["group"])
    if kind == "mxfp4":
        return mxfp4_dequant(d, K, N)
    if kind == "fp8":
        return fp8_dequant(d, K, N)
    return int4_dequant(d, K, N, m["group"])


def test_formats_read_the_same_values(cases):
    for d, m in cases:
        want = dequant(d, m)
        got = raw(d, "dequant", "<f8").reshape(m["K"], m["N"])
        assert np.isfinite(want).all(), d.name
        np.testing.assert_array_equal(got, want, err_msg=d.name)


def test_decode_products_match_the_oracle(cases):
    for d, m in cases:
        K, N, M = m["K"], m["N"], m["M"]
        x = raw(d, "x", "<f8").reshape(M, K)  # the rows as the decode path rounded them
        want = x @ dequant(d, m)
        got = raw(d, "y", "<f4").reshape(M, N)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-3, (d.name, err)
