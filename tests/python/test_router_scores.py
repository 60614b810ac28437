"""The router family's score functions (router="softmax_topk" | "sigmoid", renormalize,
scaling_factor), the DeepSeek-V3 selection bias (bias_update_rate, expert_bias,
update_expert_bias), group-limited routing (n_groups, topk_groups) and Switch jitter, in
moe.MoE against the PyTorch formulas of torch_ref_scores.py: routing, outputs, the balancing
loss, and every gradient (W_g, W_noise, x and the experts' weights) through the layer. Also
the bias update rule, checkpoints and the `moe train` flags."""
import itertools
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import moe
import errors_doc
import torch_ref as R
import torch_ref_scores as RS

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))


close = R.close


def random_case(opts, seed, expert="mlp", noise="learned", training=True):
    """A layer with random weights (and selection bias when asked) whose routing is
    unambiguous in float32; returns (m, cfg, params, x, eps, bias)."""
    rng = np.random.default_rng(seed)
    E = opts.get("n_experts", 8)
    cfg = dict(d_model=int(rng.integers(3, 8)), n_experts=E, k=opts.get("k", 2),
               expert=expert, d_ff=int(rng.integers(3, 9)), noise=noise,
               aux_alpha=0.3, z_alpha=0.05, seed=seed,
               capacity_factor=opts.get("capacity_factor"))
    for key in ("router", "renormalize", "scaling_factor", "n_groups", "topk_groups",
                "jitter", "bias_update_rate", "tie_break", "group_score", "selection_bias"):
        if key in opts:
            cfg[key] = opts[key]
    bias_on = opts.get("bias_update_rate", 0.0) > 0 or opts.get("selection_bias", False)
    for attempt in range(50):
        T = int(rng.integers(10, 25))
        m = moe.MoE(**cfg)
        params = {}
        for name, p in m.parameters().items():
            scale = 1.0 if name in ("W_g", "W_noise") else 1 / math.sqrt(p.shape[-2] if p.ndim == 3 else 4)
            params[name] = (rng.normal(size=p.shape) * scale).astype(np.float32)
            setattr(m, name, params[name])
        bias = None
        if bias_on:
            spread = {"softmax_topk": 0.05, "sigmoid": 0.2}.get(cfg.get("router"), 0.8)
            bias = (rng.normal(size=E) * spread).astype(np.float32)
            m.expert_bias = bias
        x = rng.normal(size=(T, cfg["d_model"])).astype(np.float32)
        eps = rng.normal(size=(T, E)).astype(np.float32) if noise != "none" else None
        # The jitter factors come from the library's generator: a dry run shows them.
        u = None
        if training and cfg.get("jitter", 0) > 0:
            m.forward(x, noise=eps, step=0)
            u = m.routing.jitter
        ref = RS.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                             eps=None if eps is None else R.t64(eps), training=training,
                             jitter_u=u, sel_bias=bias)
        if ref["margin"] > 1e-4 and ref["cut_margin"] > 1e-4:
            return m, cfg, params, x, eps, bias
    raise AssertionError("could not draw a case without near-ties")


OPTIONS = [
    dict(router="softmax_topk"),
    dict(router="softmax_topk", renormalize=True),
    dict(router="softmax_topk", scaling_factor=2.5, k=3),
    dict(router="sigmoid"),
    dict(router="sigmoid", renormalize=True, scaling_factor=2.5),
    dict(router="sigmoid", renormalize=True, k=1),
    dict(scaling_factor=1.7),  # the default topk_softmax, scaled
    dict(router="sigmoid", renormalize=True, bias_update_rate=0.001),
    dict(router="softmax_topk", bias_update_rate=0.001, k=3),
    dict(bias_update_rate=0.001),  # topk_softmax: the bias in selection only
    dict(router="sigmoid", renormalize=True, n_groups=4, topk_groups=2, k=3),
    dict(router="sigmoid", renormalize=True, scaling_factor=2.5, n_groups=4, topk_groups=2,
         bias_update_rate=0.001, k=4),  # DeepSeek-V3's combination
    dict(router="softmax_topk", n_groups=8, topk_groups=3),
    dict(n_groups=2, topk_groups=1, tie_break="low"),
    dict(jitter=0.2),
    dict(router="sigmoid", renormalize=True, jitter=0.3, n_groups=2, topk_groups=1),
    dict(router="softmax_topk", renormalize=True, jitter=0.1, capacity_factor=0.8),
    dict(router="softmax_topk", scaling_factor=2.5, n_groups=4, topk_groups=2,
         group_score="max", k=3),  # DeepSeek-V2's group_limited_greedy
    dict(router="sigmoid", renormalize=True, scaling_factor=2.5, n_groups=4, topk_groups=2,
         selection_bias=True, k=4),  # DeepSeek-V3 with its bias loaded, never updated
    dict(n_groups=4, topk_groups=1, group_score="max", selection_bias=True, k=1),
]
CASES = list(itertools.product(range(len(OPTIONS)), ["learned", "none"]))


def case_id(c):
    i, noise = c
    return "-".join(f"{k}={v}" for k, v in OPTIONS[i].items()) + f"-{noise}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_and_backward_match_torch(case):
    i, noise = case
    seed = 500 + CASES.index(case)
    expert = ["mlp", "swiglu", "linear_relu"][seed % 3]
    m, cfg, params, x, eps, bias = random_case(OPTIONS[i], seed, expert, noise)
    y = m.forward(x, noise=eps, step=0)
    u = m.routing.jitter
    assert (u is not None) == (cfg.get("jitter", 0) > 0)

    P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
    xt = R.t64(x).requires_grad_(True)
    ref = RS.moe_forward(P, xt, cfg, eps=None if eps is None else R.t64(eps), jitter_u=u,
                         sel_bias=bias)
    np.testing.assert_array_equal(m.routing.indices, ref["indices"].numpy())
    assert m.stats["load_before"] == ref["load_before"]
    close(m.routing.weights, ref["weights"].detach().numpy(), 2e-6, 2e-7, "weights")
    close(m.routing.probs, ref["probs"].detach().numpy(), 2e-6, 2e-7, "probs")
    yr = ref["y"].detach().numpy()
    close(y, yr, rtol=1e-4, atol=1e-5 * (1 + np.abs(yr).max()), what="y")
    assert np.count_nonzero(y) >= 0.3 * y.size  # zero trust
    close(m.aux_loss, ref["aux_loss"].item(), rtol=1e-5, atol=1e-7, what="aux_loss")
    close(m.z_loss, ref["z_loss"].item(), rtol=1e-5, atol=1e-7, what="z_loss")

    dx, g = R.check_backward(m, ref["y"], [ref["aux_loss"], ref["z_loss"]], xt, P,
                             np.random.default_rng(seed + 1000))
    assert np.count_nonzero(g["W_g"]) > 0 and np.count_nonzero(g["W1"]) > 0
    if noise == "learned":
        assert np.count_nonzero(g["W_noise"]) > 0


@pytest.mark.parametrize("i", range(len(OPTIONS)), ids=[case_id((i, ""))[:-1] for i in range(len(OPTIONS))])
def test_evaluation_matches_torch_without_noise_or_jitter(i):
    m, cfg, params, x, eps, bias = random_case(OPTIONS[i], 900 + i, training=False)
    y = m.forward(x, training=False)
    assert m.routing.jitter is None
    ref = RS.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                         training=False, sel_bias=bias)
    np.testing.assert_array_equal(m.routing.indices, ref["indices"].numpy())
    yr = ref["y"].numpy()
    close(y, yr, rtol=1e-4, atol=1e-5 * (1 + np.abs(yr).max()), what="y")


def test_softmax_topk_renormalized_equals_the_default():
    kw = dict(d_model=5, n_experts=6, k=3, noise="none", seed=4, router_init_std=1.0)
    a = moe.MoE(router="softmax_topk", renormalize=True, **kw)
    b = moe.MoE(**kw)
    x = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    close(a.forward(x), b.forward(x), 1e-6, 1e-7, "y")
    np.testing.assert_array_equal(a.routing.indices, b.routing.indices)


def test_jitter_reaches_the_router_only():
    """With jitter the router's logits are (x·u)·W_g, while the experts see x: pinning the
    routing (one expert) leaves the output unchanged by jitter."""
    kw = dict(d_model=4, n_experts=1, k=1, noise="none", seed=2, router_init_std=1.0)
    a, b = moe.MoE(jitter=0.4, **kw), moe.MoE(**kw)
    x = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float32)
    ya, yb = a.forward(x, step=3), b.forward(x, step=3)
    np.testing.assert_array_equal(ya, yb)
    u = a.routing.jitter
    assert u.shape == (7, 4) and np.all((u >= 0.6) & (u < 1.4)) and np.any(u != 1)
    close(a.routing.logits, (x * u) @ a.W_g, 1e-5, 1e-6, "jittered logits")
    # A fresh step draws fresh factors; the same step the same ones.
    a.forward(x, step=4)
    assert np.any(a.routing.jitter != u)
    a.forward(x, step=3)
    np.testing.assert_array_equal(a.routing.jitter, u)


def test_update_expert_bias_follows_deepseek_rule():
    m = moe.MoE(6, 8, 2, router="sigmoid", noise="none", bias_update_rate=0.01,
                router_init_std=1.0, seed=5)
    assert m.expert_bias.shape == (8,) and not np.any(m.expert_bias)
    assert m.config["bias"] is True  # the constructor flag (b1/b2) is unchanged
    rng = np.random.default_rng(3)
    want = np.zeros(8)
    for step in range(4):
        x = rng.normal(size=(20, 6)).astype(np.float32)
        m.forward(x)
        load = m.stats["load_before"]
        want = RS.update_expert_bias(want, load, 0.01)
        m.forward(x, training=False)  # evaluation does not feed the update
        m.update_expert_bias()
        close(m.expert_bias, want, 1e-5, 1e-7, f"bias after step {step}")
        m.update_expert_bias()  # once per training forward
        close(m.expert_bias, want, 1e-5, 1e-7, "bias after a second call")
    assert np.any(want != 0)
    off = moe.MoE(6, 8, 2, noise="none")
    off.forward(x)
    off.update_expert_bias()
    assert not np.any(off.expert_bias)


def test_bias_balances_load_without_a_loss():
    """DeepSeek-V3's claim in small: a router skewed towards a few experts gets balanced by
    the bias alone (aux_alpha = 0, no gradient step)."""
    m = moe.MoE(8, 8, 2, router="sigmoid", noise="none", aux_alpha=0.0, bias_update_rate=0.02,
                router_init_std=1.0, seed=7)
    W = m.W_g
    W[:, :2] += 1.5  # experts 0 and 1 score high for most tokens
    m.W_g = W
    x = np.abs(np.random.default_rng(8).normal(size=(256, 8))).astype(np.float32)
    m.forward(x)
    before = np.array(m.stats["load_before"])
    for _ in range(200):
        m.forward(x)
        m.update_expert_bias()
    after = np.array(m.stats["load_before"])
    assert before.std() / before.mean() > 0.5
    assert after.std() / after.mean() < 0.5 * before.std() / before.mean(), (before, after)


def test_checkpoint_keeps_the_bias(tmp_path):
    m = moe.MoE(4, 4, 2, router="sigmoid", bias_update_rate=0.1, seed=1)
    m.expert_bias = [0.5, -0.25, 0.0, 1.0]
    m.save(tmp_path / "a.safetensors")
    tensors, _ = moe.load_safetensors(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(tensors["expert_bias"], [0.5, -0.25, 0.0, 1.0])
    n = moe.MoE.from_checkpoint(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(n.expert_bias, [0.5, -0.25, 0.0, 1.0])
    assert n.config["bias_update_rate"] == pytest.approx(0.1)
    # A file without the tensor (an older checkpoint) loads as zeros.
    del tensors["expert_bias"]
    moe.save_safetensors(tmp_path / "b.safetensors", tensors,
                         moe.load_safetensors(tmp_path / "a.safetensors")[1])
    n.load(tmp_path / "b.safetensors")
    assert not np.any(n.expert_bias)
    with pytest.raises(ValueError, match="expert_bias: expected shape"):
        n.expert_bias = np.zeros(3)
    # Without the option no bias tensor is written.
    moe.MoE(4, 4, 2).save(tmp_path / "c.safetensors")
    assert "expert_bias" not in moe.load_safetensors(tmp_path / "c.safetensors")[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(router="topk_softmax", renormalize=True), "renormalize"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(n_groups=3), "n_groups"),
    (dict(n_groups=2, topk_groups=3), "topk_groups"),
    (dict(n_groups=4, topk_groups=1, k=2), "k: must be at most"),
    (dict(jitter=1.0), "jitter"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
])
def test_option_errors(kwargs, message):
    args = dict(d_model=4, n_experts=4, k=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        moe.MoE(**args)


@pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")
def test_moe_train_flags(tmp_path):
    out = tmp_path / "run"
    cmd = [MOE, "train", "--steps", "30", "--batch", "64", "--eval-tokens", "256",
           "--threads", "1", "--router", "sigmoid", "--renormalize", "--scaling-factor", "2.5",
           "--bias-update-rate", "0.01", "--n-groups", "2", "--topk-groups", "1",
           "--jitter", "0.1", "--aux-alpha", "0", "--group-score", "max", "--out", str(out),
           "--json", "--no-plots"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().split("\n")[-1])
    assert math.isfinite(s["final_loss"])
    tensors, md = moe.load_safetensors(out / "model.safetensors")
    assert "expert_bias" in tensors and np.any(tensors["expert_bias"] != 0)
    cfg = json.loads(md["moe_config"])
    assert cfg["router"] == "sigmoid" and cfg["n_groups"] == 2 and cfg["jitter"] == pytest.approx(0.1)
    assert cfg["group_score"] == "max"


def test_RS2_selection_bias_shape_and_values(tmp_path):
    """docs/errors.md row RS2 (Python column)."""
    m = moe.MoE(4, 4, 2, router="sigmoid", bias_update_rate=0.1)
    with errors_doc.raises(ValueError, match=r"expert_bias: expected shape \[4\], got \[2\]"):
        m.expert_bias = [0.0, 1.0]
    m.expert_bias = [0.0, np.inf, 0.0, 0.0]
    with errors_doc.raises(ValueError, match="expert_bias: non-finite value at expert 1"):
        m.forward(np.zeros((2, 4)))
    m.expert_bias = np.zeros(4)
    m.save(tmp_path / "a.safetensors")
    tensors, md = moe.load_safetensors(tmp_path / "a.safetensors")
    tensors["expert_bias"] = np.zeros(3, dtype=np.float32)
    moe.save_safetensors(tmp_path / "b.safetensors", tensors, md)
    with errors_doc.raises(ValueError, match=r"tensor 'expert_bias' has shape \[3\] in the file, "
                                         r"but the layer expects \[4\]"):
        m.load(tmp_path / "b.safetensors")


def test_RS1_router_family_options_named():
    """docs/errors.md row RS1 (Python column): the messages name the field."""
    with errors_doc.raises(ValueError, match="scaling_factor: must be finite and > 0, got -1"):
        moe.MoE(4, 6, 2, scaling_factor=-1.0)
    with errors_doc.raises(ValueError, match=r"n_groups: must divide n_experts \(6\), got 4"):
        moe.MoE(4, 6, 2, n_groups=4)
    with errors_doc.raises(ValueError, match=r"jitter: must be in \[0, 1\), got 1"):
        moe.MoE(4, 6, 2, jitter=1.0)
