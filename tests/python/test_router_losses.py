"""Router family, this part: aux_loss none / seq / global / shazeer, drop_policy
random / priority, second_expert_policy random — moe.MoE against the PyTorch formulas of
torch_ref_losses.py (values and gradients), and `moe train` with each flag."""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import moe
import torch_ref as R
import torch_ref_losses as RL

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))


close = R.close


def make_case(cfg, seed, T=16, noise=True):
    """A layer with random parameters, input and noise whose routing has no near-ties."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        m = moe.MoE(**cfg)
        params = {}
        for name, p in m.parameters().items():
            scale = 1.0 if name in ("W_g", "W_noise") else 1 / math.sqrt(p.shape[-2] if p.ndim == 3 else 4)
            params[name] = (rng.normal(size=p.shape) * scale).astype(np.float32)
            setattr(m, name, params[name])
        x = rng.normal(size=(T, cfg["d_model"])).astype(np.float32)
        eps = rng.normal(size=(T, cfg["n_experts"])).astype(np.float32) if noise else None
        ref = RL.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                             eps=None if eps is None else R.t64(eps))
        if ref["margin"] > 1e-3:
            return m, params, x, eps
    raise AssertionError("no case without near-ties")


def compare(m, params, x, eps, cfg, seed, step=0, global_load=None, check_grads=True):
    """Forward (pinned step) and backward of moe.MoE against the torch formulas."""
    P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
    xt = R.t64(x).requires_grad_(True)
    ref = RL.moe_forward(P, xt, cfg, eps=None if eps is None else R.t64(eps), step=step,
                         global_load=global_load)
    y = m.forward(x, noise=eps, step=step)
    np.testing.assert_array_equal(m.routing.indices, ref["indices"].numpy())
    s = m.stats
    for key in ("load_before", "load_after", "dropped_assignments", "dropped_tokens"):
        assert s[key] == ref["stats"][key], key
    yr = ref["y"].detach().numpy()
    close(y, yr, 1e-4, 1e-5 * (1 + np.abs(yr).max()), "y")
    close(m.aux_loss, ref["aux_loss"].item(), 1e-5, 1e-7, "aux_loss")
    if not check_grads:
        return ref
    R.check_backward(m, ref["y"], [ref["aux_loss"], ref["z_loss"]], xt, P,
                     np.random.default_rng(seed + 7))
    return ref


def base_cfg(**kw):
    cfg = dict(d_model=5, n_experts=6, k=2, expert="mlp", d_ff=7, d_out=4, activation="gelu",
               noise="learned", noise_scale="softplus", noise_stddev=0.7, aux_alpha=0.3,
               z_alpha=0.02, seed=3)
    cfg.update(kw)
    return cfg


LOSS_CASES = [
    ("none", {}),
    ("switch", {}),
    ("seq", dict(seq_len=4)),
    ("seq", dict(seq_len=0, normalize_by_k=True)),
    ("shazeer", dict(noise="learned", noise_scale="softplus")),
    ("shazeer", dict(noise="learned", noise_scale="linear", k=1)),
    ("shazeer", dict(noise="fixed", k=3)),
    ("shazeer", dict(noise="none")),
]


@pytest.mark.parametrize("kind, kw", LOSS_CASES,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(LOSS_CASES)])
def test_aux_loss_matches_torch(kind, kw):
    cfg = base_cfg(aux_loss=kind, **kw)
    seed = LOSS_CASES.index((kind, kw)) + 11
    m, params, x, eps = make_case(cfg, seed, noise=cfg["noise"] != "none")
    ref = compare(m, params, x, eps, cfg, seed)
    if kind == "none":
        assert m.aux_loss == 0.0
    else:
        assert m.aux_loss > 1e-4  # the loss really contributes to the gradients compared


def test_shazeer_without_noise_at_evaluation():
    cfg = base_cfg(aux_loss="shazeer")
    m, params, x, eps = make_case(cfg, 5)
    m.forward(x, training=False)
    ref = RL.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                         training=False)
    gates = R.t64(m.routing.gates)
    want = cfg["aux_alpha"] * float(RL.cv_squared(gates.sum(dim=0)))
    close(m.aux_loss, want, 1e-5, 1e-7, "importance only")
    close(m.aux_loss, ref["aux_loss"].item(), 1e-5, 1e-7, "aux_loss")


def test_seq_len_must_divide_the_batch():
    m = moe.MoE(4, 4, 2, aux_loss="seq", seq_len=5)
    with pytest.raises(ValueError, match="seq_len"):
        m.forward(np.zeros((12, 4), dtype=np.float32))


def test_global_accumulates_until_reset():
    cfg = base_cfg(aux_loss="global")
    m, params, x, eps = make_case(cfg, 21, T=16)
    ref = compare(m, params, x, eps, cfg, 21, step=0)  # first forward: switch
    counts = np.array(m.stats["load_before"])
    rng = np.random.default_rng(22)
    x2 = rng.normal(size=(10, 5)).astype(np.float32)
    e2 = rng.normal(size=(10, 6)).astype(np.float32)
    compare(m, params, x2, e2, cfg, 22, step=1, global_load=(counts, 16))
    m.reset_global_load()
    compare(m, params, x2, e2, cfg, 23, step=1)


DROP_CASES = [(pol, sec) for pol in ("random", "priority", "position", "probs")
              for sec in ("all", "random")]


@pytest.mark.parametrize("policy, second", DROP_CASES, ids=[f"{p}-{s}" for p, s in DROP_CASES])
def test_drop_policies_match_torch(policy, second):
    cfg = base_cfg(drop_policy=policy, second_expert_policy=second, capacity_factor=0.75,
                   seed=7)
    seed = DROP_CASES.index((policy, second)) + 40
    m, params, x, eps = make_case(cfg, seed, T=24)
    ref = compare(m, params, x, eps, cfg, seed, step=5)
    assert m.stats["dropped_assignments"] > 0
    # Another step draws other random priorities / second-expert decisions.
    if policy == "random" or second == "random":
        masks = set()
        for step in range(6):
            r = RL.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                               eps=R.t64(eps), step=step)
            masks.add(r["keep"].tobytes())
        assert len(masks) > 1


def test_philox_matches_the_router_noise():
    # The Python Philox reproduces the library's generated noise (stream 0 is the noise:
    # Box–Muller on words 0, 1 of the block of experts 0..3), so the dispatch streams are
    # drawn from the same generator.
    w = RL.philox([0, 0, 0, 0], (9, 0))
    u1 = ((w[0] >> 8) + 1) * 2.0 ** -24
    u2 = (w[1] >> 8) * 2.0 ** -24
    z0 = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    m = moe.MoE(2, 4, 1, noise="fixed", noise_stddev=1.0, seed=9, router_init_std=0.0)
    m.forward(np.zeros((1, 2), dtype=np.float32), step=0)
    assert abs(m.routing.noisy_logits[0, 0] - z0) < 1e-5


CLI_FLAGS = [
    ["--aux-loss", "none"],
    ["--aux-loss", "seq", "--seq-len", "32"],
    ["--aux-loss", "global"],
    ["--aux-loss", "shazeer"],
    ["--drop-policy", "random", "--capacity-factor", "1.0"],
    ["--drop-policy", "priority", "--capacity-factor", "1.0"],
    ["--second-expert-policy", "random"],
]


@pytest.mark.skipif(not Path(MOE).exists(), reason="moe not built")
@pytest.mark.parametrize("flags", CLI_FLAGS, ids=["-".join(f[:2]) for f in CLI_FLAGS])
def test_moe_train_with_flag(tmp_path, flags):
    cmd = [MOE, "train", "--steps", "30", "--batch", "64", "--eval-tokens", "256",
           "--threads", "1", *flags, "--out", str(tmp_path / "run"), "--json", "--no-plots"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().split("\n")[-1])
    assert s["steps"] == 30
    assert s["final_loss"] < s["initial_loss"]
    model = s["config"]["model"]
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag[2:].replace("-", "_")
        if key in model and isinstance(model[key], str):
            assert model[key] == value, key
    if flags[1] == "none":
        assert s["final_aux_loss"] == 0.0


SHARED_CASES = [(kind, n, gate) for kind in ("linear_relu", "mlp", "swiglu")
                for n, gate in ((1, False), (2, True))]


@pytest.mark.parametrize("kind, n, gate", SHARED_CASES,
                         ids=[f"{k}-{n}-{'gate' if g else 'nogate'}" for k, n, g in SHARED_CASES])
def test_shared_experts_match_torch(kind, n, gate):
    cfg = base_cfg(expert=kind, n_shared_experts=n, shared_gate=gate, capacity_factor=1.0)
    seed = SHARED_CASES.index((kind, n, gate)) + 60
    m, params, x, eps = make_case(cfg, seed)
    names = set(m.parameters())
    assert "Ws1" in names and ("w_shared_gate" in names) == gate
    assert m.Ws1.shape[0] == n
    compare(m, params, x, eps, cfg, seed)
    assert set(m.grads) == names
    assert np.count_nonzero(m.grads["Ws1"]) > 0


def test_shared_experts_checkpoint_roundtrip(tmp_path):
    m = moe.MoE(6, 4, 2, expert="swiglu", d_ff=8, n_shared_experts=2, shared_gate=True, seed=1)
    rng = np.random.default_rng(3)
    m.w_shared_gate = rng.normal(size=6)
    m.Ws2 = rng.normal(size=m.Ws2.shape)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    y = m.forward(x, training=False)
    m.save(str(tmp_path / "m.safetensors"))
    n = moe.MoE(6, 4, 2, expert="swiglu", d_ff=8, n_shared_experts=2, shared_gate=True, seed=9)
    n.load(str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(n.w_shared_gate, m.w_shared_gate)
    np.testing.assert_array_equal(n.forward(x, training=False), y)
    with pytest.raises(ValueError):
        moe.MoE(6, 4, 2, shared_gate=True)  # needs n_shared_experts > 0


def test_moe_train_shared_experts(tmp_path):
    if not Path(MOE).exists():
        pytest.skip("moe not built")
    cmd = [MOE, "train", "--steps", "30", "--batch", "64", "--eval-tokens", "256",
           "--threads", "1", "--n-shared-experts", "1", "--shared-gate",
           "--out", str(tmp_path / "run"), "--json", "--no-plots"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().split("\n")[-1])
    assert s["config"]["model"]["n_shared_experts"] == 1
    assert s["final_loss"] < s["initial_loss"]


def test_moe_train_refuses_seq_len_not_dividing_the_batch(tmp_path):
    if not Path(MOE).exists():
        pytest.skip("moe not built")
    out = tmp_path / "run"
    r = subprocess.run([MOE, "train", "--steps", "2", "--batch", "64", "--aux-loss", "seq",
                        "--seq-len", "5", "--out", str(out), "--no-plots"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "seq_len" in r.stderr and len(r.stderr.strip().split("\n")) == 1
    assert not out.exists()
