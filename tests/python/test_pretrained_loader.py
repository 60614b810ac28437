"""The pretrained loader (SPEC §7) on hand-written model folders: every family in both tensor
layouts against the float64 reference of tests/python/pretrained_folders.py, the file dtypes
(F32, BF16, F16, F8_E4M3 with block scales, MXFP4), sharded folders, `moe inspect`, memory
without masters, and one clear error for each kind of bad folder. (transformers itself as the
oracle: test_pretrained_hf.py.)"""
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import moe
import pretrained_folders as pf

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLI = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))


def load(path, layer, precision="fp32", **kw):
    return moe.MoE.from_pretrained(path, layer, precision=precision, **kw)


def check_block(layer, c, held, x, rtol, atol_rel):
    y = layer.forward(x, training=False)
    ref, chosen = pf.reference(c, held, x)
    got = np.sort(layer.routing.indices, axis=1)
    np.testing.assert_array_equal(got, chosen)
    scale = np.abs(ref).max()
    assert scale > 0.1  # not a pass on zeros
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=atol_rel * scale)


def make(tmp_path, family, stacked=False, dtype="F32", seed=0, layers=None, **kw):
    c = pf.tiny_config(family, **kw.pop("config", {}))
    layers = layers if layers is not None else [c["num_hidden_layers"] - 1]
    ws = {l: pf.random_weights(c, seed=seed + l) for l in layers}
    path = str(tmp_path / f"{family}-{'stacked' if stacked else 'published'}-{dtype}")
    held = pf.write_folder(path, c, ws, dtype=dtype, stacked=stacked, **kw)
    return path, c, held


def tokens(c, T=24, seed=5):
    return np.random.default_rng(seed).standard_normal((T, c["hidden_size"])).astype(np.float32)


# gpt_oss checkpoints are stacked only.
@pytest.mark.parametrize("family,stacked", [(f, s) for f in pf.FAMILIES for s in (False, True)
                                            if f != "gpt_oss" or s])
def test_family_fp32(tmp_path, family, stacked):
    path, c, held = make(tmp_path, family, stacked)
    layer_idx = c["num_hidden_layers"] - 1
    layer = load(path, layer_idx)
    x = tokens(c)
    check_block(layer, c, held[layer_idx], x, rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("family", pf.FAMILIES)
def test_family_bf16(tmp_path, family):
    path, c, held = make(tmp_path, family, stacked=family == "gpt_oss", dtype="BF16")
    layer_idx = c["num_hidden_layers"] - 1
    layer = load(path, layer_idx, "bf16")
    assert layer.config["precision"] == "bf16"
    x = tokens(c)
    y = layer.forward(x, training=False)
    ref, chosen = pf.reference(c, held[layer_idx], x)
    np.testing.assert_array_equal(np.sort(layer.routing.indices, axis=1), chosen)
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_dtypes_exact_in_fp32(tmp_path, dtype):
    # The files' values widened exactly: an fp32 layer matches the reference on them.
    path, c, held = make(tmp_path, "mixtral", dtype=dtype)
    check_block(load(path, 1), c, held[1], tokens(c), rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("block", [(128, 128), (4, 8)])
def test_deepseek_v3_fp8_block_scales(tmp_path, stacked, block):
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    path, c, held = make(tmp_path, "deepseek_v3", stacked, fp8=block, config=cfg, layers=[1, 2])
    info = moe.inspect_pretrained(path)
    assert "F8_E4M3" in info["dtypes"]
    check_block(load(path, 2), c, held[2], tokens(c), rtol=1e-4, atol_rel=1e-5)


def test_gpt_oss_mxfp4(tmp_path):
    path, c, held = make(tmp_path, "gpt_oss", stacked=True, mxfp4=True, layers=[0, 1])
    info = moe.inspect_pretrained(path)
    assert info["dtypes"].get("MXFP4") == 2
    x = tokens(c) * 2
    check_block(load(path, 1), c, held[1], x, rtol=1e-4, atol_rel=1e-5)
    # bf16: the MXFP4 values are exact in bf16; only the products round.
    y = load(path, 1, "bf16").forward(x, training=False)
    ref, _ = pf.reference(c, held[1], x)
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_gpt_oss_clamp_is_reached(tmp_path):
    # The reference's clamp matters on these weights: without it the output differs.
    path, c, held = make(tmp_path, "gpt_oss", stacked=True)
    x = tokens(c) * 3
    h = held[1]
    g = np.einsum("td,efd->tef", x.astype(np.float64), h["gate"]) + h["bg"]
    assert (g > 7.0).any()
    check_block(load(path, 1), c, h, x, rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_sharded(tmp_path, family):
    path, c, held = make(tmp_path, family, shards=3, layers=list(range(pf.tiny_config(family)["num_hidden_layers"])) if family != "deepseek_v3" else [1, 2])
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    for l in held:
        check_block(load(path, l), c, held[l], tokens(c), rtol=1e-4, atol_rel=1e-5)
    info = moe.inspect_pretrained(path)
    assert len(info["files"]) == 3


def test_masters_and_memory_form(tmp_path):
    path, c, held = make(tmp_path, "qwen2_moe")
    lean = load(path, 1, "bf16")
    assert "W1" not in lean.parameter_names and "Ws1" not in lean.parameter_names
    assert "W_g" in lean.parameter_names and "w_shared_gate" in lean.parameter_names
    with pytest.raises(moe.Error, match="training needs the fp32 masters") as err:
        lean.forward(tokens(c), training=True)
    # Regression (issue 22): the message told Python users to "pass training=false", which
    # is C++'s spelling; it names no surface's keyword now.
    assert "training=false" not in str(err.value)
    full = load(path, 1, "bf16", masters=True)
    np.testing.assert_allclose(full.W1, held[1]["gate"].transpose(0, 2, 1), rtol=1e-6)
    np.testing.assert_allclose(full.W2, held[1]["down"].transpose(0, 2, 1), rtol=1e-6)
    x = tokens(c)
    # Same bf16 copies either way: the same outputs.
    np.testing.assert_array_equal(lean.forward(x, training=False), full.forward(x, training=False))
    # fp32: the masters are the held form.
    assert "W1" in load(path, 1, "fp32").parameter_names


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_save_and_load_without_masters(tmp_path, precision):
    # A loaded block (no fp32 masters) saves the weights it holds; the file makes a layer
    # with masters and loads into another block without them, each giving the same outputs.
    path, c, _ = make(tmp_path, "qwen2_moe")  # a shared expert too (Ws1, Ws2, Ws3)
    lean = load(path, 1, precision)
    x = tokens(c)
    y = lean.forward(x)
    ck = str(tmp_path / "lean.safetensors")
    lean.save(ck)
    back = moe.MoE.from_checkpoint(ck)
    assert back.holds_masters and not lean.holds_masters
    for name in ("W1", "W2", "W3", "Ws1", "Ws2", "Ws3"):
        held = lean.expert_matrix(name)
        assert np.abs(held).max() > 0  # not a pass on zeros
        np.testing.assert_array_equal(back.expert_matrix(name), held)
    other_path, _, _ = make(tmp_path / "other", "qwen2_moe", seed=7)
    other = load(other_path, 1, precision)
    assert not np.allclose(other.forward(x), y)
    other.load(ck)
    if precision == "bf16":  # the same bf16 values, packed the same way
        np.testing.assert_array_equal(back.forward(x, training=False), y)
        np.testing.assert_array_equal(other.forward(x), y)
    else:  # re-quantized: the same int8 values, the scales to within their last bit
        np.testing.assert_allclose(back.forward(x, training=False), y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.forward(x), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(moe.Error, match="not an expert matrix"):
        lean.expert_matrix("W_g")


def test_forward_defaults_to_what_the_layer_can_do(tmp_path):
    # An evaluation-only layer evaluates when `training` is left out; a trainable one trains
    # (its noise counter advances, so two default forwards draw different noise).
    path, c, _ = make(tmp_path, "mixtral")
    x = tokens(c)
    for lean in (load(path, 1, "bf16"), load(path, 1, "int8")):
        np.testing.assert_array_equal(lean.forward(x), lean.forward(x, training=False))
    dropped = load(path, 1, "bf16", masters=True)
    dropped.drop_masters()
    np.testing.assert_array_equal(dropped.forward(x), dropped.forward(x, training=False))
    layer = moe.MoE(d_model=16, n_experts=4, k=2, d_ff=8, seed=3)
    xs = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    first, second = layer.forward(xs), layer.forward(xs)
    assert layer.aux_loss > 0  # a training forward computes the balancing loss
    assert not np.array_equal(first, second)  # fresh noise: step advanced
    np.testing.assert_array_equal(layer.forward(xs, training=False),
                                  layer.forward(xs, training=False))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_inspect_config_builds_the_layer(tmp_path, family):
    """Regression (issue 22): inspect_pretrained's config named the experts' bias switch
    expert_bias (the P9 error) and held 0 for the default widths; it is moe.MoE's keywords,
    as layer.config is, so moe.MoE(**config) builds a layer of the block's configuration."""
    layers = [1, 2] if family.startswith("deepseek") else [0, 1]
    path, c, held = make(tmp_path, family, stacked=family == "gpt_oss", layers=layers)
    info = moe.inspect_pretrained(path)
    config = info["config"]
    assert "expert_bias" not in config and "bias" in config
    layer = moe.MoE(**config)
    first = load(path, info["moe_layers"][0], config["precision"])
    assert layer.config == first.config == config


def test_inspect(tmp_path):
    path, c, held = make(tmp_path, "deepseek_v2", layers=[1, 2])
    info = moe.inspect_pretrained(path)
    assert info["family"] == "deepseek_v2"
    assert info["moe_layers"] == [1, 2] and info["dense_layers"] == [0]
    assert (info["n_experts"], info["k"], info["d_model"], info["d_ff"]) == (8, 2, 16, 8)
    assert info["n_shared_experts"] == 1 and info["shared_d_ff"] == 16  # 2 x 8, one MLP
    assert info["layout"] == "per-expert" and info["dtypes"] == {"F32": 3 * 8 + 1 + 3}
    d, E, F = 16, 8, 8
    assert info["file_bytes_per_block"] == 4 * (E * d + 3 * E * d * F + 3 * 2 * F * d)
    assert info["bf16_bytes_per_block"] == 4 * E * d + 2 * (3 * E * d * F + 3 * 2 * F * d)
    assert "max" in info["router"]
    assert info["config"]["group_score"] == "max"


def test_cli_inspect(tmp_path):
    path, c, held = make(tmp_path, "mixtral", stacked=True, layers=[0, 1])
    out = subprocess.run([CLI, "inspect", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "mixtral" in out.stdout and "E = 8, k = 2" in out.stdout
    out = subprocess.run([CLI, "inspect", path, "--json"], capture_output=True, text=True)
    j = json.loads(out.stdout)
    assert j["family"] == "mixtral" and j["layout"] == "stacked" and j["moe_layers"] == [0, 1]
    bad = subprocess.run([CLI, "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "not a directory" in bad.stderr
    assert subprocess.run([CLI, "inspect", "--help"], capture_output=True).returncode == 0


def test_torch_module(tmp_path):
    torch = pytest.importorskip("torch")
    import moe.torch as mt
    path, c, held = make(tmp_path, "olmoe")
    m = mt.MoE.from_pretrained(path, 1, precision="fp32")
    assert not m.training
    x = tokens(c)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).numpy()
    ref, _ = pf.reference(c, held[1], x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # bf16 without masters: only the router is a parameter; training mode is refused.
    m = mt.MoE.from_pretrained(path, 1)
    assert [n for n, _ in m.named_parameters()] == ["W_g"]
    with torch.no_grad():
        yb = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(yb, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    m.train()
    with pytest.raises(moe.Error, match="training needs the fp32 masters"):
        m(torch.from_numpy(x))


# ---- errors: one line naming the file and the tensor or key ------------------------------------

def err(path, layer=1, match=None):
    with pytest.raises(moe.Error, match=match) as e:
        load(path, layer)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_error_unknown_model_type(tmp_path):
    path, c, held = make(tmp_path, "mixtral", config={"model_type": "llama"})
    m = err(path, match="model_type 'llama' is not a family")
    assert "mixtral" in m and "gpt_oss" in m and "config.json" in m


def test_error_missing_config_key(tmp_path):
    path, c, held = make(tmp_path, "qwen3_moe")
    cfg = json.load(open(os.path.join(path, "config.json")))
    del cfg["moe_intermediate_size"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    err(path, match="missing key 'moe_intermediate_size'.*qwen3_moe")
    with pytest.raises(moe.Error, match="missing key"):
        moe.inspect_pretrained(path)


def test_error_config_key_type(tmp_path):
    path, c, held = make(tmp_path, "qwen3_moe", config={"num_experts_per_tok": "two"})
    err(path, match="'num_experts_per_tok' must be an integer")


def test_error_config_sizes(tmp_path):
    path, c, held = make(tmp_path, "deepseek_v2", config={"num_hidden_layers": 2**54},
                         layers=[1])
    err(path, match="'num_hidden_layers' must be in 1..65536")
    path, c, held = make(tmp_path, "olmoe", config={"num_experts_per_tok": 9})
    err(path, match="olmoe block is not a valid layer: k: must be in 1..8")


def test_error_missing_tensor(tmp_path):
    path, c, held = make(tmp_path, "mixtral")
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    t[name.replace("w3", "w4")] = t.pop(name)  # misspelled
    save_file(t, f)
    m = err(path, match="experts.3.w3.weight' not found")
    assert path in m


def test_error_wrong_shape(tmp_path):
    path, c, held = make(tmp_path, "qwen3_moe", stacked=True)
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    name = "model.layers.1.mlp.experts.down_proj"
    t[name] = t[name][:, :, :4].contiguous()
    save_file(t, f)
    m = err(path, match=r"experts.down_proj': expected shape \[8, 16, 8\], got \[8, 16, 4\]")
    assert "model.safetensors" in m


def test_error_unknown_dtype(tmp_path):
    path, c, held = make(tmp_path, "olmoe")
    from safetensors.torch import load_file, save_file
    import torch
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    name = "model.layers.1.mlp.gate.weight"
    t[name] = t[name].to(torch.int32)
    save_file(t, f)
    err(path, match="mlp.gate.weight': dtype I32 is not a weight format")


def test_error_fp8_without_scales(tmp_path):
    path, c, held = make(tmp_path, "deepseek_v3", fp8=(128, 128))
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    del t["model.layers.2.mlp.experts.0.up_proj.weight_scale_inv"]
    save_file(t, f)
    err(path, 2, match="experts.0.up_proj.weight': F8_E4M3 weight without its block scales")


def test_error_truncated_shard(tmp_path):
    path, c, held = make(tmp_path, "mixtral", shards=2, layers=[0, 1])
    shard = os.path.join(path, "model-00002-of-00002.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    m = err(path, match="run past the end of the data section")
    assert "model-00002-of-00002.safetensors" in m


def test_error_corrupt_header(tmp_path):
    path, c, held = make(tmp_path, "mixtral")
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"{{{{")
    err(path, match="model.safetensors'.*not valid JSON")


def test_error_index_names_missing_file(tmp_path):
    path, c, held = make(tmp_path, "mixtral", shards=2, layers=[0, 1])
    os.remove(os.path.join(path, "model-00001-of-00002.safetensors"))
    err(path, match="index .*model.safetensors.index.json' names the file "
                    "'model-00001-of-00002.safetensors', which does not exist")


def test_error_index_escapes_folder(tmp_path):
    path, c, held = make(tmp_path, "mixtral", shards=2, layers=[0, 1])
    ip = os.path.join(path, "model.safetensors.index.json")
    idx = json.load(open(ip))
    idx["weight_map"]["model.embed_tokens.weight"] = "../elsewhere.safetensors"
    json.dump(idx, open(ip, "w"))
    err(path, match="is not a file inside the folder")


def test_error_dense_layer(tmp_path):
    path, c, held = make(tmp_path, "deepseek_v3", layers=[1, 2])
    m = err(path, 0, match="layer: 0 of this deepseek_v3 model is a dense MLP")
    assert "first_k_dense_replace = 1" in m and "nearest MoE layers are 1" in m
    path, c, held = make(tmp_path, "qwen2_moe", config={"mlp_only_layers": [1]}, layers=[0])
    err(path, 1, match="dense MLP.*mlp_only_layers.*nearest MoE layers are 0")


def test_error_layer_out_of_range(tmp_path):
    path, c, held = make(tmp_path, "olmoe")
    err(path, 7, match="layer: 7 is out of range.*2 layers")


def test_error_no_block_tensors(tmp_path):
    path, c, held = make(tmp_path, "olmoe", layers=[1])
    err(path, 0, match="no tensor of layer 0's MoE block")


def test_error_not_a_folder(tmp_path):
    err(str(tmp_path / "missing"), match="not a directory")
    os.makedirs(tmp_path / "empty")
    err(str(tmp_path / "empty"), match="no config.json")
