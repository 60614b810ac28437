"""moe.MoE.save / load / from_checkpoint and moe.load_safetensors / save_safetensors:
round trips, optimizer state, and refusal of files that do not fit."""
import json

import numpy as np
import pytest

import moe


def trained_layer(**kw):
    args = dict(d_model=5, n_experts=4, k=2, expert="swiglu", d_ff=7, capacity_factor=1.5,
                router_init_std=0.4, seed=9)
    args.update(kw)
    m = moe.MoE(**args)
    rng = np.random.default_rng(0)
    for n, p in m.parameters().items():
        setattr(m, n, rng.normal(size=p.shape))
    return m


@pytest.mark.parametrize("kind", ["linear_relu", "mlp", "swiglu"])
def test_round_trip(tmp_path, kind):
    a = trained_layer(expert=kind)
    path = tmp_path / "a.safetensors"
    a.save(path, metadata={"note": "hello"})
    b = moe.MoE(5, 4, 2, expert=kind, d_ff=7, capacity_factor=1.5, seed=1)
    md = b.load(str(path))
    assert md["note"] == "hello"
    for n, p in a.parameters().items():
        np.testing.assert_array_equal(b.parameters()[n], p)
    x = np.random.default_rng(2).normal(size=(20, 5))
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=False))
    c = moe.MoE.from_checkpoint(path)
    assert c.config == a.config
    np.testing.assert_array_equal(c.forward(x, training=False), a.forward(x, training=False))


def test_file_is_plain_safetensors(tmp_path):
    a = trained_layer()
    path = tmp_path / "a.safetensors"
    a.save(path)
    tensors, md = moe.load_safetensors(path)
    assert set(tensors) == set(a.parameters())
    for n, p in a.parameters().items():
        np.testing.assert_array_equal(tensors[n], p)
    cfg = json.loads(md["moe_config"])
    assert cfg["expert"] == "swiglu" and cfg["n_experts"] == 4
    # The header is JSON after an 8-byte little-endian length, data F32 little-endian.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start, end = header["W_g"]["data_offsets"]
    assert header["W_g"]["dtype"] == "F32" and header["W_g"]["shape"] == [5, 4]
    np.testing.assert_array_equal(
        np.frombuffer(raw[8 + n + start:8 + n + end], dtype="<f4").reshape(5, 4), a.W_g)


def test_save_safetensors_any_tensors(tmp_path):
    t = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones(4, dtype=np.int32)}
    moe.save_safetensors(tmp_path / "t.safetensors", t, metadata={"k": "v"})
    back, md = moe.load_safetensors(tmp_path / "t.safetensors")
    assert md == {"k": "v"}
    np.testing.assert_array_equal(back["a"], t["a"].astype(np.float32))
    np.testing.assert_array_equal(back["b"], t["b"].astype(np.float32))


def test_optimizer_state_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            m.forward(x, training=False)
            m.backward(dy)
            opt.step()

    a = trained_layer()
    oa = moe.Adam(a, lr=0.01)
    train(a, oa, 3)
    a.save(tmp_path / "ck.safetensors", optimizer=oa)
    b = trained_layer(seed=3)
    ob = moe.Adam(b, lr=0.01)
    b.load(tmp_path / "ck.safetensors", optimizer=ob)
    assert ob.step_count == 3
    train(a, oa, 2)
    train(b, ob, 2)
    for n, p in a.parameters().items():
        np.testing.assert_array_equal(b.parameters()[n], p)


def test_refuses_a_file_that_does_not_fit(tmp_path):
    a = trained_layer()
    a.save(tmp_path / "a.safetensors")
    other = moe.MoE(5, 4, 2, expert="swiglu", d_ff=9)
    before = other.parameters()
    with pytest.raises(ValueError, match="W1"):
        other.load(tmp_path / "a.safetensors")
    for n, p in before.items():  # nothing changed
        np.testing.assert_array_equal(other.parameters()[n], p)
    with pytest.raises(ValueError, match="W2|W3|b1"):
        moe.MoE(5, 4, 2, expert="mlp", d_ff=7).load(tmp_path / "a.safetensors")


@pytest.mark.parametrize("mangle", [
    lambda raw: raw[:20],                              # truncated
    lambda raw: (10**12).to_bytes(8, "little") + raw[8:],  # header length past the end
    lambda raw: raw[:9] + b"!" + raw[10:],             # broken JSON
    lambda raw: raw[:-4],                               # data shorter than the offsets say
])
def test_refuses_a_broken_file(tmp_path, mangle):
    a = trained_layer()
    a.save(tmp_path / "a.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle((tmp_path / "a.safetensors").read_bytes()))
    with pytest.raises(ValueError):
        trained_layer().load(bad)
    with pytest.raises(ValueError, match="missing|No such|not found|open"):
        trained_layer().load(tmp_path / "does-not-exist.safetensors")


def test_config_json_names_the_experts_bias_switch_bias(tmp_path):
    """Issue 22: one name for the experts' b1/b2 switch. The checkpoint's moe_config says
    "bias", as moe.MoE's keyword and layer.config do; a file of the old name still loads."""
    import json
    m = moe.MoE(4, 4, 2, d_ff=8, bias=False)
    path = tmp_path / "m.safetensors"
    m.save(str(path))
    tensors, md = moe.load_safetensors(str(path))
    cfg = json.loads(md["moe_config"])
    assert cfg["bias"] is False and "expert_bias" not in cfg
    assert moe.MoE(**{k: v for k, v in m.config.items()}).config == m.config
    cfg["expert_bias"] = cfg.pop("bias")          # as files written before the rename
    md["moe_config"] = json.dumps(cfg)
    old = tmp_path / "old.safetensors"
    moe.save_safetensors(str(old), tensors, md)
    back = moe.MoE.from_checkpoint(str(old))
    assert back.config["bias"] is False and "b1" not in back.parameter_names
