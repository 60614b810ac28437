"""precision="int8" (SPEC §6, evaluation only) from Python: the forward against a NumPy oracle
that applies the same quantization (weights per output column, each product's input rows per
row, round half to even, clamp ±127) and sums in float64 — tight — and against the fp32 layer
within 2%; the same bits through every kernel (MOE_MAX_ISA, MOE_AMX_EMULATE); checkpoints holding I8 weights and F32 scales; training refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import moe
from precision_oracle import CASES, pair, rel, rounded_oracle


def quantized(v, axis):
    """v (float32) after symmetric int8 quantization along `axis` (scales over the other)."""
    v = np.asarray(v, dtype=np.float32)
    s = (np.abs(v).max(axis=axis, keepdims=True) / np.float32(127)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.rint(v / safe), -127, 127)
    q = np.where(s > 0, q, 0)
    return q.astype(np.float64) * s.astype(np.float64)


def oracle(m, x):
    """y from the routing of the last forward, experts on the quantized operands."""
    return rounded_oracle(m, x, lambda W: quantized(W, 0), lambda v: quantized(v, 0))


@pytest.mark.parametrize("expert,activation,E,k,T", CASES)
def test_int8_matches_the_quantized_oracle_and_fp32(expert, activation, E, k, T):
    rng = np.random.default_rng(E * 100 + T)
    d, f = 34, 75  # sizes off every vector width and the kernel's 64-column blocks
    m32, m8 = pair("int8", d, E, k, expert=expert, d_ff=f, activation=activation,
                   noise="none", router_init_std=0.5, seed=E + T)
    assert m8.config["precision"] == "int8"
    x = rng.standard_normal((T, d)).astype(np.float32)
    y32 = m32.forward(x, training=False)
    y8 = m8.forward(x, training=False)
    np.testing.assert_array_equal(np.asarray(m8.routing.indices), np.asarray(m32.routing.indices))
    want = oracle(m8, x)
    assert np.count_nonzero(want) > want.size // 2  # not passing on zeros
    assert rel(y8, want) < 1e-3
    assert 1e-5 < rel(y8, y32) < 2e-2


def test_training_is_refused_and_assignments_reach_the_int8_copies():
    m = moe.MoE(16, 4, 2, precision="int8", expert="swiglu", d_ff=24, seed=1)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="precision: 'int8' is for evaluation only"):
        m.forward(x, training=True)
    y0 = m.forward(x, training=False)
    np.testing.assert_array_equal(m.forward(x), y0)  # an int8 layer evaluates by default
    with pytest.raises(ValueError, match="precision"):
        m.backward(np.ones_like(y0))
    m.W2 = -m.W2
    y1 = m.forward(x, training=False)
    assert rel(y1, oracle(m, x)) < 1e-3 and not np.allclose(y0, y1)


def test_checkpoint_holds_i8_weights_and_scales(tmp_path):
    m = moe.MoE(40, 4, 2, precision="int8", expert="mlp", d_ff=70, seed=3)
    path = tmp_path / "m.safetensors"
    m.save(str(path))
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    assert header["W1"]["dtype"] == "I8" and header["W2"]["dtype"] == "I8"
    assert header["W1.scale"]["dtype"] == "F32" and header["W1.scale"]["shape"] == [4, 70]
    assert header["W_g"]["dtype"] == "F32"
    assert '"precision":"int8"' in header["__metadata__"]["moe_config"].replace(" ", "")
    # int8 weights plus scales: far less than the fp32 file.
    m32 = moe.MoE(40, 4, 2, expert="mlp", d_ff=70, seed=3)
    p32 = tmp_path / "f.safetensors"
    m32.save(str(p32))
    assert os.path.getsize(path) < 0.4 * os.path.getsize(p32)

    m2 = moe.MoE(40, 4, 2, precision="int8", expert="mlp", d_ff=70)
    m2.load(str(path))
    x = np.random.default_rng(2).standard_normal((6, 40)).astype(np.float32)
    y, y2 = m.forward(x, training=False), m2.forward(x, training=False)
    assert np.abs(y2 - y).max() <= 1e-5 * np.abs(y).max()
    with pytest.raises(ValueError, match="holds int8 weights.*precision 'fp32'"):
        moe.MoE(40, 4, 2, expert="mlp", d_ff=70).load(str(path))
    # An fp32 checkpoint loads into an int8 layer (quantized on load).
    m3 = moe.MoE(40, 4, 2, precision="int8", expert="mlp", d_ff=70)
    m3.load(str(p32))
    assert m3.config["precision"] == "int8"


PORTABLE_SCRIPT = """
import json
import numpy as np
import moe
out = {"info": moe.cpu_info()}
for expert in ["swiglu", "mlp"]:
    m = moe.MoE(72, 6, 2, expert=expert, d_ff=136, noise="none", router_init_std=0.5, seed=9,
                precision="int8", n_shared_experts=1)
    x = np.random.default_rng(0).standard_normal((30, 72)).astype(np.float32)
    out[expert] = m.forward(x, training=False).tolist()
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


def test_every_kernel_gives_the_same_bits():
    """The int8 sums are exact integers on every kernel: the portable loop (MOE_MAX_ISA=avx2,
    which also holds oneDNN's fp32 router to AVX2: its bits may move, so there within 1e-5),
    VNNI (avx512 and up) and AMX's tdpbusd (here on its emulation)."""
    base = run_with({})
    runs = [({"MOE_MAX_ISA": "avx2"}, "portable"), ({"MOE_AMX_EMULATE": "1"}, "amx_int8 emulated")]
    if base["info"]["best"] != "avx2" and base["info"]["int8_kernel"] != "portable":
        runs.append(({"MOE_MAX_ISA": "avx512"}, "avx512_vnni"))
    for extra, kernel in runs:
        got = run_with(extra)
        assert got["info"]["int8_kernel"].startswith(kernel), got["info"]
        for expert in ["swiglu", "mlp"]:
            a, b = np.array(base[expert]), np.array(got[expert])
            assert np.count_nonzero(a) > a.size // 2
            if extra.get("MOE_MAX_ISA") == "avx2":  # oneDNN's fp32 router held to AVX2
                assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), extra
            else:
                np.testing.assert_array_equal(a, b)


def test_bench_int8_rows():
    """`moe bench --precision int8`: decode T = 1, 4, 16 beside the memory roof of the selected
    experts' int8 bytes and scales, and the real-model blocks beside the bf16 roof."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    exe = os.environ.get("MOE_BIN", str(root / "build" / "bin" / "moe"))
    if not Path(exe).exists():
        pytest.skip(f"{exe} not built")
    r = subprocess.run([exe, "bench", "--quick", "--no-peer", "--threads", "2", "--repeat", "1",
                        "--json", "--precision", "int8"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [row["name"] for row in rows] == ["B3-T1", "B3-T4", "B3-T16", "Qwen3-30B-A3B",
                                             "Mixtral-8x7B"]
    assert "int8 B3-T1 within 1.15x of its memory roof" in r.stderr
    for row in rows:
        assert row["precision"] == "int8" and row["fwd_s"] > 0 and row["fwdbwd_s"] is None
        if row["name"].startswith("B3"):
            assert row["roof_kind"] == "memory"
            # --quick B3: d 128, d_ff 256, swiglu: 3·128·256 int8 bytes an expert, plus 8 bytes
            # a column (2·256 + 128 columns), plus the router's fp32 W_g (128 × 8).
            per_expert = 3 * 128 * 256 + 8 * (2 * 256 + 128)
            assert row["selected_weight_bytes"] == row["experts_evaluated"] * per_expert + 128 * 8 * 4
        else:
            assert row["roof_kind"] == "bf16+memory"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_tiny_pretrained_blocks_within_2_percent_of_fp32(tmp_path, family):
    """SPEC §7's tiny model folders loaded with precision='int8' (no fp32 masters: the expert
    matrices are quantized as they are read): the same routing as fp32 and the block's output
    within 2% (Frobenius) of the fp32 block's — every family's expert kind, shared experts
    (qwen2_moe, deepseek_v3) and clamped SwiGLU with biases (gpt_oss) included."""
    sys.path.insert(0, os.path.dirname(__file__))
    import pretrained_folders as pf
    if family not in pf.FAMILIES:
        pytest.skip(f"{family} is not a family of pretrained_folders")
    c = pf.tiny_config(family)
    layer = c["num_hidden_layers"] - 1
    path = str(tmp_path / family)
    pf.write_folder(path, c, {layer: pf.random_weights(c, seed=layer)}, dtype="F32",
                    stacked=family == "gpt_oss")
    m32 = moe.MoE.from_pretrained(path, layer, precision="fp32")
    m8 = moe.MoE.from_pretrained(path, layer, precision="int8")
    assert m8.config["precision"] == "int8"
    x = np.random.default_rng(5).standard_normal((24, c["hidden_size"])).astype(np.float32)
    y32, y8 = m32.forward(x, training=False), m8.forward(x, training=False)
    np.testing.assert_array_equal(np.asarray(m8.routing.indices), np.asarray(m32.routing.indices))
    assert np.abs(y32).max() > 0.1
    assert 1e-5 < rel(y8, y32) < 2e-2, rel(y8, y32)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_tiny_pretrained_block_matches_the_quantized_oracle(tmp_path, family):
    """The same tiny folders (families without shared experts, plain SwiGLU): the int8 block
    loaded without masters against the float64 oracle applying the same quantization to the
    fp32 block's weights, on the fp32 block's routing (the same as int8's)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import pretrained_folders as pf
    if family not in pf.FAMILIES:
        pytest.skip(f"{family} is not a family of pretrained_folders")
    c = pf.tiny_config(family)
    layer = c["num_hidden_layers"] - 1
    path = str(tmp_path / family)
    pf.write_folder(path, c, {layer: pf.random_weights(c, seed=layer)}, dtype="F32")
    m32 = moe.MoE.from_pretrained(path, layer, precision="fp32")
    m8 = moe.MoE.from_pretrained(path, layer, precision="int8")
    x = np.random.default_rng(6).standard_normal((19, c["hidden_size"])).astype(np.float32)
    m32.forward(x, training=False)
    y8 = m8.forward(x, training=False)
    np.testing.assert_array_equal(np.asarray(m8.routing.indices), np.asarray(m32.routing.indices))
    want = oracle(m32, x)
    assert np.abs(want).max() > 0.1
    assert rel(y8, want) < 1e-3, rel(y8, want)
