"""`moe gate` and `moe route` (SPEC §5): the reference examples, a NumPy/PyTorch
cross-check on random inputs, and the error contract (exit 2, one stderr line naming the
field, nothing on stdout)."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))

pytestmark = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")


def run(args, stdin=None):
    return subprocess.run([MOE, *args], input=stdin, capture_output=True, text=True, timeout=60)


def call(cmd, doc):
    """Runs `moe CMD --input -` on doc (a dict, or raw text); returns the parsed output."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    r = run([cmd, "--input", "-"], text)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)


# --- reference examples ---------------------------------------------------------------------

EX1 = dict(X=[[1, 2]], W_g=[[1, 0], [0, 1]], W_noise=[[.5, .5], [.5, .5]], N=[[1, -1]], k=2)
EX2 = dict(X=[[1, 0], [0, 1]], W_g=[[1, .5, 0], [0, .5, 1]], W_noise=[[.1] * 3] * 2,
           N=[[.5, -.5, .2], [.1, 0, -.1]], k=2)
EX3 = dict(X=[[1, 1]], W_g=[[2, 1, .5], [0, 1, .5]], W_noise=[[.1] * 3] * 2, N=[[0, 0, 0]], k=1)


@pytest.mark.parametrize("ex,expected", [
    (EX1, [[0.881, 0.119]]),
    (EX2, [[0.646, 0.354, 0.0], [0.0, 0.38, 0.62]]),
    (EX3, [[0.0, 1.0, 0.0]]),
])
def test_route_reference_linear(ex, expected):
    out = call("route", {**ex, "noise_scale": "linear", "round": 3})
    assert out["gates"] == expected


@pytest.mark.parametrize("ex,expected", [
    (EX1, [[0.917, 0.083]]),
    (EX2, [[0.773, 0.0, 0.227], [0.0, 0.395, 0.605]]),
])
def test_route_reference_softplus_default(ex, expected):
    out = call("route", {**ex, "round": 3})
    assert out["gates"] == expected


def test_route_tie_goes_high_or_low():
    # Example 3: h = [2, 2, 1]; the tie between experts 0 and 1 goes to the higher index.
    assert call("route", {**EX3, "noise_scale": "linear"})["indices"] == [[1]]
    assert call("route", {**EX3, "noise_scale": "linear", "tie_break": "low"})["indices"] == [[0]]


def test_route_outputs_are_consistent():
    out = call("route", {**EX2, "noise_scale": "linear"})
    g = np.array(out["gates"])
    idx = np.array(out["indices"])
    w = np.array(out["weights"])
    assert idx.shape == (2, 2) and w.shape == (2, 2) and g.shape == (2, 3)
    assert idx.tolist() == [[0, 1], [2, 1]]  # best first
    np.testing.assert_allclose(np.take_along_axis(g, idx, 1), w, rtol=0, atol=0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


# --- cross-check against an independent NumPy / PyTorch formulation ------------------------

def reference_route(X, W_g, k, W_noise=None, N=None, scale="softplus", training=True):
    h = X.astype(np.float64) @ W_g
    if W_noise is not None and training:
        z = X.astype(np.float64) @ W_noise
        s = np.logaddexp(0.0, z) if scale == "softplus" else z
        h = h + s * N
    order = np.argsort(-h, axis=1, kind="stable")  # random floats: no ties
    idx = order[:, :k]
    top = np.take_along_axis(h, idx, 1)
    w = np.exp(top - top.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    g = np.zeros_like(h)
    np.put_along_axis(g, idx, w, 1)
    return g, idx, w


@pytest.mark.parametrize("seed", range(6))
def test_route_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    T, d, E = rng.integers(1, 9), rng.integers(1, 7), rng.integers(1, 11)
    k = int(rng.integers(1, E + 1))
    X = rng.normal(size=(T, d)).astype(np.float32)
    W_g = rng.normal(size=(d, E)).astype(np.float32)
    W_noise = rng.normal(size=(d, E)).astype(np.float32)
    N = rng.normal(size=(T, E)).astype(np.float32)
    scale = ["softplus", "linear"][seed % 2]
    out = call("route", dict(X=X.tolist(), W_g=W_g.tolist(), W_noise=W_noise.tolist(),
                             N=N.tolist(), k=k, noise_scale=scale))
    g, idx, w = reference_route(X, W_g, k, W_noise, N, scale)
    assert np.array(out["indices"]).tolist() == idx.tolist()
    np.testing.assert_allclose(out["weights"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["gates"], g, rtol=1e-4, atol=1e-5)


def test_route_without_w_noise_has_no_noise_and_eval_drops_noise():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(5, 4)).astype(np.float32)
    W_g = rng.normal(size=(4, 6)).astype(np.float32)
    W_noise = rng.normal(size=(4, 6)).astype(np.float32)
    g, _, _ = reference_route(X, W_g, 2)
    plain = call("route", dict(X=X.tolist(), W_g=W_g.tolist(), k=2, seed=3))
    np.testing.assert_allclose(plain["gates"], g, rtol=1e-4, atol=1e-5)
    ev = call("route", dict(X=X.tolist(), W_g=W_g.tolist(), W_noise=W_noise.tolist(), k=2,
                            training=False))
    np.testing.assert_allclose(ev["gates"], g, rtol=1e-4, atol=1e-5)


def test_route_generated_noise_depends_on_seed_only():
    rng = np.random.default_rng(8)
    doc = dict(X=rng.normal(size=(64, 4)).tolist(), W_g=np.zeros((4, 8)).tolist(),
               W_noise=np.ones((4, 8)).tolist(), k=2, noise_scale="softplus")
    a = call("route", {**doc, "seed": 1})
    b = call("route", {**doc, "seed": 1})
    c = call("route", {**doc, "seed": 2})
    assert a == b
    assert a["indices"] != c["indices"]  # W_g = 0: the noise alone decides


def test_gate_eval_matches_torch_topk_softmax():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(20, 9)).astype(np.float32)
    out = call("gate", dict(logits=logits.tolist(), k=3, training=False))
    t = torch.from_numpy(logits)
    top, idx = torch.topk(t, 3, dim=1)
    ref = torch.zeros_like(t).scatter(1, idx, torch.softmax(top, dim=1)).numpy()
    np.testing.assert_allclose(out["gates"], ref, rtol=1e-5, atol=1e-6)


def test_gate_keeps_the_logits_shape():
    flat = call("gate", dict(logits=[0.5, 3.0, 1.0, 2.0], k=2, training=False))["gates"]
    assert len(flat) == 4 and not isinstance(flat[0], list)
    e = np.exp([3.0, 2.0])
    np.testing.assert_allclose(flat, [0, e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-6)
    nested = call("gate", dict(logits=[[0.5, 3.0, 1.0, 2.0]], k=2, training=False))["gates"]
    assert nested == [flat]


def test_gate_training_noise():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(200, 8)).tolist()
    a = np.array(call("gate", dict(logits=logits, k=2, noise_stddev=1.0, seed=11))["gates"])
    b = np.array(call("gate", dict(logits=logits, k=2, noise_stddev=1.0, seed=11))["gates"])
    c = np.array(call("gate", dict(logits=logits, k=2, noise_stddev=1.0, seed=12))["gates"])
    ev = np.array(call("gate", dict(logits=logits, k=2, training=False))["gates"])
    assert ((a > 0).sum(1) == 2).all()
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, ev)  # σ = 1 moves some selections
    zero = np.array(call("gate", dict(logits=logits, k=2, noise_stddev=0.0, seed=11))["gates"])
    np.testing.assert_allclose(zero, ev, rtol=0, atol=0)


def test_input_from_file(tmp_path):
    f = tmp_path / "in.json"
    f.write_text(json.dumps({**EX1, "noise_scale": "linear", "round": 3}))
    r = run(["route", "--input", str(f)])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gates"] == [[0.881, 0.119]]


# --- errors --------------------------------------------------------------------------------

GOOD_ROUTE = dict(X=[[1, 2], [3, 4]], W_g=[[1, 0, 0], [0, 1, 0]], k=2)
GOOD_GATE = dict(logits=[[1, 2, 3]], k=2)

BAD = [
    # (command, input text, a word the message must contain)
    ("gate", json.dumps({"k": 2}), "logits"),
    ("gate", json.dumps({"logits": [[1, 2, 3]]}), "k"),
    ("gate", json.dumps({**GOOD_GATE, "k": 4}), "k"),
    ("gate", json.dumps({**GOOD_GATE, "k": 0}), "k"),
    ("gate", json.dumps({**GOOD_GATE, "k": "2"}), "k"),
    ("gate", json.dumps({**GOOD_GATE, "k": 1.5}), "k"),
    ("gate", json.dumps({"logits": [[1, 2, 3], [1, 2]], "k": 1}), "logits"),
    ("gate", json.dumps({"logits": [[1, "x", 3]], "k": 1}), "logits"),
    ("gate", json.dumps({"logits": "abc", "k": 1}), "logits"),
    ("gate", json.dumps({"logits": [], "k": 1}), "logits"),
    ("gate", '{"logits": [[1, 2, 1e999]], "k": 1}', "logits"),
    ("gate", '{"logits": [[1, 2, 1e39]], "k": 1}', "logits"),
    ("gate", json.dumps({**GOOD_GATE, "noise_stddev": -1}), "noise_stddev"),
    ("gate", json.dumps({**GOOD_GATE, "training": "yes"}), "training"),
    ("gate", json.dumps({**GOOD_GATE, "seed": -1}), "seed"),
    ("gate", json.dumps({**GOOD_GATE, "logit": [1]}), "logit"),
    ("gate", '{"logits": [[1, 2, 3]], "k": ', "JSON"),
    ("gate", "[1, 2]", "object"),
    ("route", json.dumps({**GOOD_ROUTE, "W_g": [[1, 0, 0]]}), "W_g"),
    ("route", json.dumps({k: v for k, v in GOOD_ROUTE.items() if k != "X"}), "X"),
    ("route", json.dumps({k: v for k, v in GOOD_ROUTE.items() if k != "W_g"}), "W_g"),
    ("route", json.dumps({**GOOD_ROUTE, "X": [[1, 2], [3]]}), "X"),
    ("route", json.dumps({**GOOD_ROUTE, "X": [1, 2]}), "X"),
    ("route", json.dumps({**GOOD_ROUTE, "k": 4}), "k"),
    ("route", json.dumps({**GOOD_ROUTE, "W_noise": [[1, 0], [0, 1]]}), "W_noise"),
    ("route", json.dumps({**GOOD_ROUTE, "W_noise": [[0] * 3] * 2, "N": [[0] * 3]}), "N"),
    ("route", json.dumps({**GOOD_ROUTE, "N": [[0] * 3] * 2}), "N"),
    ("route", json.dumps({**GOOD_ROUTE, "noise_scale": "cubic"}), "noise_scale"),
    ("route", json.dumps({**GOOD_ROUTE, "tie_break": "middle"}), "tie_break"),
    ("route", json.dumps({**GOOD_ROUTE, "round": -1}), "round"),
    ("route", '{"X": [[1, 2], [3, 4]], "W_g": [[1, 0, 0], [0, 1, -1e999]], "k": 2}', "W_g"),
    ("route", '{"X": [[1, 2], [3, 4]], "W_g": [[1e38, 0, 0], [1e38, 1, 0]], "k": 2}', "token"),
    ("route", "not json", "JSON"),
]


@pytest.mark.parametrize("cmd,text,field", BAD, ids=[f"{c}-{f}-{i}" for i, (c, _, f) in
                                                    enumerate(BAD)])
def test_bad_input_exit_2_one_line_naming_field(cmd, text, field):
    r = run([cmd, "--input", "-"], text)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1, r.stderr
    assert field in lines[0], lines[0]


def test_unreadable_file(tmp_path):
    r = run(["route", "--input", str(tmp_path / "missing.json")])
    assert r.returncode == 2 and r.stdout == ""
    assert "missing.json" in r.stderr and len(r.stderr.strip().split("\n")) == 1


def test_usage_errors_exit_2():
    for args in ([], ["route"], ["nosuch"], ["gate", "--input"], ["route", "--bogus", "x"]):
        r = run(args)
        assert r.returncode == 2, args
        assert r.stdout == "" and len(r.stderr.strip().split("\n")) == 1, (args, r.stderr)


@pytest.mark.parametrize("args", [[], ["gate"], ["route"], ["train"]])
def test_help_everywhere(args):
    for flag in ("--help", "-h"):
        r = run([*args, flag])
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout
