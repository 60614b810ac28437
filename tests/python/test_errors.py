"""docs/errors.md, Python and CLI columns: one test per row, named after the row (R1, L3, P2,
C4 ...). Python errors are moe.Error (a ValueError) carrying the C++ message; the CLI prints
one line `moe: <message>` on stderr, nothing on stdout, and exits with status 2. Every
message the helpers below see must be one of its row's messages in docs/errors.md
(errors_doc.py), and every row of the table has a test here or in the files of ROW_FILES."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moe
import errors_doc

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))
needs_cli = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")
needs_layer = pytest.mark.skipif(not hasattr(moe, "MoE"), reason="moe.MoE not built yet")
needs_io = pytest.mark.skipif(not hasattr(moe, "load_safetensors"), reason="moe I/O not built yet")


def raises(*parts, row=None):
    """pytest.raises(moe.Error) whose message must contain every part and be one of the
    messages of its docs/errors.md row (the test's, unless `row` names another)."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(ValueError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            assert isinstance(self.info.value, moe.Error), type(self.info.value)
            msg = str(self.info.value)
            for p in parts:
                assert p in msg, f"{p!r} not in {msg!r}"
            errors_doc.check(msg, row)
            return out
    return _Ctx()


def cli(cmd, doc, *parts, args=()):
    """Runs `moe CMD --input -` on doc (dict or text): exit 2, one stderr line with parts."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    r = subprocess.run([MOE, cmd, *args, "--input", "-"] if cmd else [MOE, *args], input=text,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe: "), r.stderr
    for p in parts:
        assert p in lines[0], f"{p!r} not in {lines[0]!r}"
    errors_doc.check(lines[0])
    return lines[0]


X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float32)
W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
ROUTE = dict(X=X.tolist(), W_g=W.tolist(), k=2)


# --- Router --------------------------------------------------------------------------------

def test_R1_k_outside_1_to_E():
    for k in (0, 5):
        with raises("k: must be in 1..4", f"got {k}"):
            moe.route(X, W, k)
        with raises("k: must be in 1..4", f"got {k}"):
            moe.noisy_top_k_gating(np.zeros((2, 4), np.float32), k)


@needs_cli
def test_R1_cli():
    cli("route", dict(ROUTE, k=0), "k: must be in 1..4", "got 0")
    cli("gate", dict(logits=[1, 2, 3, 4], k=5), "k: must be in 1..4", "got 5")


def test_R2_zero_experts():
    with raises("n_experts: must be at least 1", "got 0"):
        moe.route(X, np.zeros((3, 0), np.float32), 1)
    with raises("n_experts: must be at least 1", "got 0"):
        moe.noisy_top_k_gating(np.zeros((2, 0), np.float32), 1)


@needs_cli
def test_R2_cli():
    cli("route", dict(ROUTE, W_g=[[], [], []]), "W_g[0]: empty row")
    cli("gate", dict(logits=[], k=1), "logits: empty array")


def test_R3_zero_model_width():
    with raises("d_model: must be at least 1", "got 0"):
        moe.route(np.zeros((2, 0), np.float32), np.zeros((0, 4), np.float32), 1)


def test_R4_negative_noise_stddev():
    with raises("noise_stddev: must be finite and >= 0"):
        moe.noisy_top_k_gating(np.zeros(4, np.float32), 1, noise_stddev=-1.0)
    with raises("noise_stddev: must be finite and >= 0"):
        moe.noisy_top_k_gating(np.zeros(4, np.float32), 1, noise_stddev=float("nan"))


@needs_cli
def test_R4_cli():
    cli("gate", dict(logits=[1, 2], k=1, noise_stddev=-1), "noise_stddev: must be finite and >= 0, got -1")


@needs_layer
def test_R5_unknown_noise_mode():
    with raises("noise: unknown mode 'gaussian'", "none, fixed or learned"):
        moe.MoE(4, 2, 1, noise="gaussian")


def test_R6_unknown_noise_scale():
    with raises("noise_scale: unknown value 'exp'", "softplus or linear"):
        moe.route(X, W, 2, noise_scale="exp")


@needs_cli
def test_R6_cli():
    cli("route", dict(ROUTE, W_noise=W.tolist(), noise_scale="exp"),
        "noise_scale: unknown value 'exp'")


def test_R7_unknown_tie_break():
    with raises("tie_break: unknown value 'random'", "high, low or torch"):
        moe.route(X, W, 2, tie_break="random")


@needs_cli
def test_R7_cli():
    cli("route", dict(ROUTE, tie_break="random"), "tie_break: unknown value 'random'")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_R8_non_finite_input_names_the_token():
    x = np.ones((5, 3), np.float32)
    x[3, 1] = np.nan
    with raises("x: non-finite value at token 3"):
        moe.route(x, W, 2)
    x[3, 1] = 1.0
    x[1, 0] = np.inf
    with raises("x: non-finite value at token 1"):
        moe.route(x, W, 2)
    # float64 beyond float32's range becomes inf at the boundary: the same error.
    x64 = np.ones((2, 3))
    x64[1, 2] = 1e300
    with raises("non-finite value at token 1"):
        moe.route(x64, W, 2)


@needs_cli
def test_R8_cli():
    # JSON has no NaN; a number outside float32 (or double) range is the CLI's non-finite input.
    cli("route", dict(ROUTE, X=[[1, 2, 3], [1, 1e39, 3]]), "X[1][1]: non-finite value")
    cli("route", '{"X": [[1, 2, 3], [1, 2, 1e999]], "W_g": %s, "k": 2}' % json.dumps(W.tolist()),
        "X[1][2]: non-finite value")
    cli("gate", dict(logits=[[1, 2], [3, 1e39]], k=1), "logits[1][1]: non-finite value")


def test_R9_non_finite_logits_name_the_token():
    x = np.ones((3, 3), np.float32)
    x[2] = 3e38
    with raises("router logits h: non-finite value at token 2"):
        moe.route(x, np.ones((3, 4), np.float32), 2)


@needs_cli
def test_R9_cli():
    cli("route", dict(X=[[0, 0], [3e38, 3e38]], W_g=[[3, 1], [3, 1]], k=1),
        "router logits h: non-finite value at token 1")


def test_R10_non_finite_noisy_logits_name_the_token():
    with raises("noisy logits", "non-finite value at token 1"):
        moe.noisy_top_k_gating(np.array([[0, 0], [3e38, 3e38]], np.float32), 1,
                               noise_stddev=3e38, seed=1)


def test_R11_noise_without_w_noise():
    with raises("noise: given without W_noise"):
        moe.route(X, W, 2, noise=np.zeros((2, 4), np.float32))


@needs_cli
def test_R11_cli():
    cli("route", dict(ROUTE, N=[[0] * 4] * 2), "N: given without W_noise")


def test_R13_empty_batch_is_an_empty_result():
    r = moe.route(np.zeros((0, 3), np.float32), W, 2)
    assert r.gates.shape == (0, 4) and r.indices.shape == (0, 2) and r.weights.shape == (0, 2)
    g = moe.noisy_top_k_gating(np.zeros((0, 4), np.float32), 2)
    assert g.shape == (0, 4)


@needs_layer
def test_R13_layer_empty_batch():
    m = moe.MoE(3, 4, 2, d_ff=5)
    y = m.forward(np.zeros((0, 3), np.float32))
    assert y.shape == (0, 3)
    dx = m.backward(np.zeros((0, 3), np.float32))
    assert dx.shape == (0, 3)


# --- Layer ---------------------------------------------------------------------------------

@needs_layer
def test_L1_capacity_factor_not_positive():
    for cf in (0.0, -1.0, float("nan"), float("inf")):
        with raises("capacity_factor: must be finite and > 0"):
            moe.MoE(3, 4, 2, capacity_factor=cf)


@needs_layer
def test_L2_unknown_expert_kind():
    with raises("expert: unknown kind 'ffn'", "linear_relu, mlp, swiglu or clamped_swiglu"):
        moe.MoE(3, 4, 2, expert="ffn")


@needs_layer
def test_L3_unknown_activation():
    with raises("activation: unknown value 'tanh'", "relu, gelu or silu"):
        moe.MoE(3, 4, 2, activation="tanh")


@needs_layer
def test_L4_unknown_drop_policy():
    with raises("drop_policy: unknown value 'random_order'"):
        moe.MoE(3, 4, 2, capacity_factor=1.0, drop_policy="random_order")


@needs_layer
def test_L5_bad_widths():
    with raises("d_ff"):
        moe.MoE(3, 4, 2, d_ff=-1)
    with raises("d_out"):
        moe.MoE(3, 4, 2, d_out=0)


@needs_layer
def test_L6_residual_needs_square_layer():
    with raises("residual: needs d_out == d_model"):
        moe.MoE(3, 4, 2, d_out=5, residual=True)


@needs_layer
def test_L7_negative_loss_weights():
    with raises("aux_alpha: must be finite and >= 0"):
        moe.MoE(3, 4, 2, aux_alpha=-0.1)
    with raises("z_alpha: must be finite and >= 0"):
        moe.MoE(3, 4, 2, z_alpha=float("nan"))


@needs_layer
def test_L8_dimensions_too_large():
    with raises("d_model: too large"):
        moe.MoE(1 << 40, 4, 2)


@needs_layer
def test_L9_parameter_count_overflows():
    with raises("too large"):
        moe.MoE(1 << 24, 1 << 30, 2, d_ff=1 << 24)
    with raises("too large"):
        moe.MoE(1 << 15, 1 << 14, 2, d_ff=1 << 15)


@needs_layer
def test_L10_parameter_assigned_with_wrong_shape():
    m = moe.MoE(3, 4, 2, d_ff=5)
    with raises("W1: expected shape [4, 3, 5]", "got [4, 3]"):
        m.W1 = np.zeros((4, 3), np.float32)
    with raises("W_g: expected shape [3, 4]"):
        m.W_g = np.zeros((4, 3), np.float32)
    with raises("W2: expected a numeric array"):
        m.W2 = np.array([["a"] * 3] * 5)


@needs_layer
def test_L11_unknown_parameter():
    m = moe.MoE(3, 4, 2, expert="swiglu", d_ff=5)
    with pytest.raises(AttributeError):
        m.b1 = np.zeros((4, 5), np.float32)  # swiglu has no biases


@needs_layer
def test_L12_backward_before_forward():
    m = moe.MoE(3, 4, 2, d_ff=5)
    with raises("backward: called before forward"):
        m.backward(np.zeros((2, 3), np.float32))
    x = np.ones((2, 3), np.float32)
    x[1, 1] = np.nan
    with raises("x: non-finite value at token 1", row="R8"):
        m.forward(x)
    with raises("backward: called before forward"):
        m.backward(np.zeros((2, 3), np.float32))


@needs_layer
def test_L15_batch_too_large_for_memory():
    # About 64 TiB of workspace for 2^26 one-wide tokens: refused from the sizes alone, before
    # x is read. np.zeros maps untouched zero pages, so the test itself stays small.
    m = moe.MoE(1, 4, 1, d_ff=1 << 16)
    x = np.zeros((1 << 26, 1), np.float32)
    with raises("forward: workspace for the batch"):
        m.forward(x)


def test_L16_precision():
    with raises("precision: unknown value 'fp16' (expected fp32, bf16, int8, int4, mxfp4 or fp8)"):
        moe.MoE(8, 4, 2, precision="fp16")
    with raises("precision: 'int8' needs d_model, d_ff and d_out <= 65536, got 8, 65537, 8"):
        moe.MoE(8, 4, 2, precision="int8", d_ff=65537)
    with raises("precision: 'int8' is for evaluation only"):
        moe.MoE(8, 4, 2, precision="int8").forward(np.zeros((1, 8), np.float32), training=True)
    for p in ("int4", "mxfp4", "fp8"):
        with raises(f"precision: '{p}' is for evaluation only"):
            moe.MoE(8, 4, 2, precision=p).forward(np.zeros((1, 8), np.float32), training=True)
    with raises("int4_group: must be 32, 64 or 128, got 16"):
        moe.MoE(8, 4, 2, precision="int4", int4_group=16)
    with raises("precision: unknown value 'fp16' (expected auto, fp32, bf16, int8, int4, mxfp4 "
                "or fp8)"):
        moe.MoE.from_pretrained("no-such-folder", 0, precision="fp16")
    r = subprocess.run([MOE, "train", "--precision", "half"], capture_output=True, text=True)
    assert r.returncode == 2 and "precision" in r.stderr and not r.stdout


# --- Python shapes and dtypes --------------------------------------------------------------

def test_P1_not_a_numeric_array():
    with raises("X: expected a numeric array"):
        moe.route([["a", "b", "c"]], W, 2)
    with raises("X: expected an array, got None"):
        moe.route(None, W, 2)
    with raises("logits: expected a numeric array"):
        moe.noisy_top_k_gating({"a": 1}, 1)


def test_P8_input_too_large_to_convert():
    # A broadcast view of 2^42 values must be copied to float32: the copy cannot be made.
    x = np.broadcast_to(np.float64(1), (1 << 40, 4))
    with raises("X: cannot convert", "values to a float32 array (out of memory)"):
        moe.route(x, np.ones((4, 4), np.float32), 2)


def test_P2_wrong_number_of_dimensions():
    with raises("X: expected a 2-D array", "got shape [3]"):
        moe.route(np.ones(3, np.float32), W, 2)
    with raises("logits: expected a 1-D (E) or 2-D (T, E) array", "got shape [1, 2, 4]"):
        moe.noisy_top_k_gating(np.zeros((1, 2, 4), np.float32), 1)


def test_P3_weights_do_not_match_input():
    with raises("W_g: expected shape [3, 4]", "got [2, 4]"):
        moe.route(X, np.ones((2, 4), np.float32), 2)
    with raises("W_noise: expected shape [3, 4]"):
        moe.route(X, W, 2, W_noise=np.ones((3, 5), np.float32))
    with raises("noise: expected shape [2, 4]"):
        moe.route(X, W, 2, W_noise=W, noise=np.zeros((3, 4), np.float32))


def test_P4_negative_seed():
    with raises("seed: must be >= 0", "got -1"):
        moe.route(X, W, 2, seed=-1)


@needs_layer
def test_P5_forward_input_shape():
    m = moe.MoE(3, 4, 2, d_ff=5)
    with raises("x: expected shape (T, 3)", "got [2, 4]"):
        m.forward(np.ones((2, 4), np.float32))
    with raises("noise: expected shape [2, 4]"):
        m.forward(np.ones((2, 3), np.float32), noise=np.zeros((2, 5), np.float32))


@needs_layer
def test_P6_gradient_shape_does_not_match_forward():
    m = moe.MoE(3, 4, 2, d_ff=5)
    m.forward(np.ones((2, 3), np.float32))
    with raises("dy: expected shape [2, 3]", "got [3, 3]"):
        m.backward(np.ones((3, 3), np.float32))


@needs_layer
def test_P7_balancing_loss_indices():
    probs = np.full((1, 4), 0.25, np.float32)
    with raises("indices: expert index out of range 0..3", "got 4"):
        moe.load_balancing_loss(np.array([[0, 4]]), probs, 4)
    with raises("indices: expected an integer array"):
        moe.load_balancing_loss(np.array([[0.5, 1.0]]), probs, 4)


@needs_layer
def test_P9_old_expert_bias_keyword():
    # expert_bias is the selection-bias attribute; the experts' b1/b2 switch is bias=.
    with raises("expert_bias: not a constructor keyword; use bias=True/False"):
        moe.MoE(6, 4, 2, expert_bias=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'biass'"):
        moe.MoE(6, 4, 2, biass=False)
    assert "b1" not in moe.MoE(6, 4, 2, bias=False).parameters()
    assert moe.MoE(6, 4, 2).expert_bias.shape == (4,)


# --- Command line --------------------------------------------------------------------------

@needs_cli
def test_C1_invalid_json():
    cli("route", '{"X": [[1, 2], ', "input: invalid JSON at byte")
    cli("gate", b"\xff\xfe".decode("latin-1"), "input: invalid JSON")


@needs_cli
def test_C2_not_an_object():
    cli("gate", "[1, 2, 3]", "input: expected a JSON object, got array")


@needs_cli
def test_C3_unknown_field():
    cli("route", dict(ROUTE, W_G=[[1]]), "W_G: unknown field (expected one of")


@needs_cli
def test_C4_missing_field():
    cli("route", dict(X=X.tolist(), k=2), "W_g: missing")
    cli("gate", dict(logits=[1, 2]), "k: missing")


@needs_cli
def test_C5_wrong_type():
    cli("route", dict(ROUTE, k="2"), "k: expected an integer, got string")
    cli("route", dict(ROUTE, k=1.5), "k: expected an integer, got 1.5")
    cli("route", dict(ROUTE, training="yes"), "training: expected true or false")
    cli("route", dict(ROUTE, X=[[1, "a", 3]]), "X[0][1]: expected a number, got string")


@needs_cli
def test_C6_shapes():
    cli("route", dict(ROUTE, X=[[1, 2, 3], [1, 2]]), "X: ragged array (row 1 has 2 entries")
    cli("route", dict(ROUTE, W_g=W[:2].tolist()), "W_g: expected 3 rows")
    cli("route", dict(ROUTE, W_noise=W.tolist(), N=[[0] * 4]), "N: expected shape [2, 4]")
    cli("route", dict(ROUTE, b_g=[0, 0]), "b_g: expected a flat array of 4 numbers")


@needs_cli
def test_C7_out_of_range_options():
    cli("route", dict(ROUTE, round=16), "round: must be in 0..15, got 16")
    cli("route", dict(ROUTE, seed=-3), "seed: must be >= 0, got -3")


@needs_cli
def test_C8_unreadable_input(tmp_path):
    r = subprocess.run([MOE, "gate", "--input", str(tmp_path / "nope.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert "input: cannot open" in r.stderr and "nope.json" in r.stderr


@needs_cli
def test_C9_usage_errors():
    # Regression (issue 22): an unknown command was "A subcommand is required".
    cli(None, "", "unknown command 'frobnicate'", "see --help", args=["frobnicate"])
    cli(None, "", "--input", args=["gate"])


@needs_cli
def test_C10_deep_and_huge_json():
    # Deep nesting and long numbers are refused with a message, not a crash.
    cli("gate", '{"logits": ' + "[" * 5000 + "]" * 5000 + ', "k": 1}', "logits")
    cli("gate", '{"logits": [1, 2], "k": 99999999999999999999999}', "k: expected an integer")


@needs_cli
def test_C11_empty_batch_cli():
    # T = 0 cannot be written as a JSON matrix whose width is known: [] is refused by name.
    cli("route", dict(ROUTE, X=[]), "X: empty array")


# --- the table itself -------------------------------------------------------------------------

# Rows whose tests live beside the feature they belong to (each calls errors_doc.check).
ROW_FILES = ["test_errors.py", "test_router_scores.py", "test_real_model_semantics.py",
             "test_expert_choice.py", "test_pretrained_loader.py", "test_router_losses.py",
             "test_pretrained_formats.py"]
# Rows only C++ can trigger: tests/cpp/test_errors.cpp holds them to the table.
CPP_ONLY = {"R12", "L13", "L14", "M2"}
# Rows no test can reach on the project's machines; the row says why.
UNREACHABLE = {"EC2"}  # n_experts * capacity >= 2^31 needs the router's (T, E) buffers: > 40 GB


def test_every_row_has_a_test():
    here = Path(__file__).parent
    text = "".join((here / f).read_text() for f in ROW_FILES)
    cpp = (ROOT / "tests" / "cpp" / "test_errors.cpp").read_text()
    missing = [r for r in errors_doc.rows() if r not in UNREACHABLE
               and f"def test_{r}_" not in text and f"TEST(Errors, {r}_" not in cpp]
    assert not missing, f"docs/errors.md rows with no test: {missing}"


def test_a_changed_message_fails():
    """The check itself: a message the table does not show is refused."""
    assert errors_doc.matches("L4", "drop_policy: unknown value 'x' (expected position, probs, "
                                    "random or priority)")
    assert not errors_doc.matches("L4", "drop_policy: unknown value 'x' (expected position or "
                                        "probs)")


@needs_layer
def test_EC1_expert_choice_refuses_options():
    with raises("drop_policy: not supported with router 'expert_choice'"):
        moe.MoE(4, 4, 2, router="expert_choice", drop_policy="probs")
    with raises("jitter: not supported with router 'expert_choice'"):
        moe.MoE(4, 4, 2, router="expert_choice", jitter=0.1)


@needs_layer
def test_M1_layer_without_masters():
    m = moe.MoE(4, 4, 2, d_ff=8, precision="bf16")
    m.drop_masters()
    x = np.ones((3, 4), np.float32)
    # Regression (issue 22): the message said "pass training=false" (C++'s spelling) to
    # Python users; it names no surface's keyword now.
    with raises("forward: training needs the fp32 masters") as e:
        m.forward(x, training=True)
    assert "training=false" not in str(e.value)
    m.forward(x, training=False)
    with raises("backward: needs the fp32 masters"):
        m.backward(np.ones((3, 4), np.float32))


V1_SCRIPT = """
import numpy as np
import moe
try:
    moe.MoE(8, 4, 2).forward(np.ones((3, 8), np.float32), training=False)
except moe.Error as e:
    print(e)
"""


def test_V1_environment_settings_refused_by_name():
    """A kernel level or row threshold that is not one: refused by name wherever a kernel is
    first chosen, in Python and in the CLI (read once per process, hence subprocesses)."""
    for var, value, part in [("MOE_MAX_ISA", "avx512bf16", "is not a level"),
                             ("MOE_AMX_MIN_ROWS", "0", "is not a row count")]:
        env = dict(os.environ, **{var: value})
        r = subprocess.run([sys.executable, "-c", V1_SCRIPT], capture_output=True, text=True,
                           env=env, timeout=120)
        msg = r.stdout.strip()
        assert part in msg, (r.stdout, r.stderr[-2000:])
        errors_doc.check(msg, "V1")
        c = subprocess.run([MOE, "route", "--input", "-"], capture_output=True, text=True, env=env,
                           input=json.dumps({"X": [[1.0, 2.0]], "W_g": [[1.0, 0.0], [0.0, 1.0]],
                                             "k": 1}), timeout=60)
        assert c.returncode == 2, (c.returncode, c.stdout, c.stderr)
        assert c.stderr.startswith("moe: ") and part in c.stderr, c.stderr
        errors_doc.check(c.stderr.splitlines()[0], "V1")



V2_SCRIPT = """
import numpy as np
import moe
for _ in range(2):  # read once; refused again at the next layer
    try:
        layer = moe.MoE(32, 4, 2, expert="swiglu", d_ff=32, precision="int4")
        layer.forward(np.ones((3, 32), np.float32), training=False)  # quantizes the masters
    except moe.Error as e:
        print(e)
"""


def check_switch_refused(var, bad, script, row):
    """A 0|1 environment switch: `bad` refused by name at each of two layers, 0 and 1 taken."""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, **{var: bad}), timeout=120)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], (r.stdout, r.stderr[-2000:])
    assert lines[0].startswith(f"{var}: '{bad}' is not 0 or 1"), lines
    errors_doc.check(lines[0], row)
    for value in ("0", "1"):  # both accepted
        ok = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, **{var: value}), timeout=120)
        assert ok.returncode == 0 and ok.stdout == "", (value, ok.stdout, ok.stderr[-2000:])


def test_V2_the_tiled_layout_switch_refused_by_name():
    check_switch_refused("MOE_QUANT_TILED", "no", V2_SCRIPT, "V2")


V3_SCRIPT = V2_SCRIPT.replace('precision="int4"', 'precision="fp8"')


def test_V3_the_vbmi_switch_refused_by_name():
    check_switch_refused("MOE_VBMI", "yes", V3_SCRIPT, "V3")
    check_switch_refused("MOE_VBMI", "2", V3_SCRIPT.replace('"fp8"', '"mxfp4"'), "V3")


@needs_layer
def test_RS3_rounding_switches_where_they_mean_nothing():
    with raises("tie_break: 'torch' applies to token-choice routing without groups"):
        moe.MoE(8, 4, 2, tie_break="torch", n_groups=2)
    with raises("tie_break: 'torch' applies to token-choice routing", "expert_choice"):
        moe.MoE(8, 4, 2, tie_break="torch", router="expert_choice")
    with raises("round_each_op: rounds each step of the bf16 experts; needs precision bf16, "
                "not int8"):
        moe.MoE(8, 4, 2, precision="int8", round_each_op=True)
    layer = moe.MoE(8, 4, 2, precision="fp32")
    with raises("round_each_op: ", "not fp32"):
        layer.set_rounding(True, True, True, "torch")
    assert layer.config["round_each_op"] is False  # refused: nothing changed
