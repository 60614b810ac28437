"""Stored formats of pretrained folders (SPEC §6-7, docs/models.md "Stored formats"):
`from_pretrained(..., precision="auto")` keeps what the folder stores — GPTQ and AWQ int4
(written here by an independent NumPy packer from AutoGPTQ's and AutoAWQ's layouts:
pretrained_folders.gptq_pack / awq_pack), FP8 e4m3 with 128 x 128 block scales, MXFP4 — and
the block's forward equals the float64 reference on the dequantized stored bytes (the
low-bit kernels round their rows to int8 or bf16: 1e-2 relative); the held matrices are the
stored values exactly (no decode and re-quantize); explicit precisions convert; every
malformed GPTQ / AWQ tensor or quantization_config key is an error naming it (rows PQ* of
docs/errors.md)."""
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import errors_doc
import moe
import pretrained_folders as pf

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLI = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))

# Shapes the int4 formats can hold: in / out features multiples of 8 and of the group.
INT4_SHAPE = {"hidden_size": 64}


def int4_config(family, **over):
    c = pf.tiny_config(family, **INT4_SHAPE)
    d, E, F = pf.dims(c)
    key = "moe_intermediate_size" if "moe_intermediate_size" in c else "intermediate_size"
    c[key] = 64
    if family == "qwen2_moe":
        c["shared_expert_intermediate_size"] = 96
    c.update(over)
    return c


def make_int4(tmp_path, family, name="int4", layer=1, **kw):
    c = int4_config(family)
    ws = {l: pf.random_weights(c, seed=11 + l) for l in (0, 1)}  # inspect reads layer 0
    path = str(tmp_path / name)
    held = pf.write_int4_folder(path, c, ws, **kw)
    return path, c, held[layer]


def tokens(c, T=24, seed=5):
    return np.random.default_rng(seed).standard_normal((T, c["hidden_size"])).astype(np.float32)


def rel_err(y, ref):
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def kernel_rows(precision, c=None, held=None):
    """How this CPU's decode kernels round the rows of a low-bit product (docs/quant.md):
    int8 per 32 values for int4 / mxfp4 where AVX512-VNNI runs them (per min(block, 128) on
    the tiled matrices of N a multiple of 16 the layer holds there: cpu_info's 'lowbit_tiled';
    mxfp4's per 128 there where cpu_info's 'vbmi'),
    bf16 for fp8 on AVX512-BF16; None where another path runs or the block is not known (the
    tight check is skipped)."""
    info = moe.cpu_info()
    if info.get("max_isa"):
        return None
    if precision in ("int4", "mxfp4") and info["int8_kernel"] == "avx512_vnni":
        if not info["lowbit_tiled"]:
            return pf.int8_rows
        group = ((128 if info["vbmi"] else 32) if precision == "mxfp4"
                 else (held or {}).get("_group"))
        if c is None or group is None:
            return None
        d, _, F = pf.dims(c)
        outs = {}  # a product's row width -> the widths of its outputs
        for w_in, w_out in [(d, F), (F, d)] + ([(held["sgate"].shape[0], d),
                                                 (d, held["sgate"].shape[0])]
                                                if "sgate" in held else []):
            outs.setdefault(w_in, set()).add(w_out % 16 == 0)
        if any(len(v) > 1 for v in outs.values()):
            return None  # one width, products of both layouts

        def rows(a):
            w = a.shape[-1]
            if not next(iter(outs[w])):
                return pf.int8_rows(a)
            return pf.int8_rows(a, min(w if group == -1 else group, 128))
        return rows
    if precision == "fp8" and info["level"] in ("avx512_bf16", "amx"):
        return pf.round_bf16
    return None


def check_forward(layer, c, held, x, rel=3e-2, tight=True):
    """The same experts as the float64 reference on the stored values, and outputs within
    rel of it (relative Frobenius norm; none further than 3·rel of its largest value): the
    low-bit kernels round their rows (int8 per 32 values, or bf16) in both products of an
    expert, against exact rows here (measured: int8 rows 1.0-2.5%, bf16 rows 0.4%). Then,
    where this CPU's kernel is known, on 8 tokens (decode: <= 16 rows an expert) against the
    reference with the rows rounded as that kernel rounds them: 1e-5."""
    y = layer.forward(x, training=False)
    ref, chosen = pf.reference(c, held, x)
    np.testing.assert_array_equal(np.sort(layer.routing.indices, axis=1), chosen)
    scale = np.abs(ref).max()
    assert scale > 0.1  # not a pass on zeros
    assert np.isfinite(y).all()
    fro, worst = rel_err(y, ref), np.abs(y - ref).max() / scale
    assert fro < rel and worst < 3 * rel, (fro, worst)
    rows = kernel_rows(layer.config["precision"], c, held) if tight else None
    if rows is not None:
        y8 = layer.forward(x[:8], training=False)
        ref8, _ = pf.reference(c, held, x[:8], rows)
        assert rel_err(y8, ref8) < 1e-5, rel_err(y8, ref8)
    return y, ref


def check_held(layer, held, shared=False):
    """The layer holds the stored values exactly (in x out): nothing re-quantized."""
    pairs = [("W1", "gate"), ("W3", "up"), ("W2", "down")]
    if shared:
        pairs += [("Ws1", "sgate"), ("Ws3", "sup"), ("Ws2", "sdown")]
    for name, key in pairs:
        want = held[key]
        want = want.T[None] if want.ndim == 2 else want.transpose(0, 2, 1)
        np.testing.assert_array_equal(layer.expert_matrix(name), want.astype(np.float32))


# ---- precision "auto": what each format keeps ---------------------------------------------------

def test_auto_gptq_sym(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32, sym=True)
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    assert layer.config["precision"] == "int4" and not layer.holds_masters
    check_held(layer, held)
    check_forward(layer, c, held, tokens(c))
    info = moe.inspect_pretrained(path)
    assert info["auto_precision"] == "int4"
    assert info["expert_format"] == "gptq int4 g32 sym (v1 zeros)"
    assert info["dtypes"]["GPTQ-INT4"] == 3 * 8


def test_auto_gptq_asym_act_order_with_shared_expert(tmp_path):
    # Qwen1.5-MoE-GPTQ's layout: the routed and shared experts quantized, the router and the
    # shared expert's gate F16; act-order (scattered groups) and the v1 zero convention.
    path, c, held = make_int4(tmp_path, "qwen2_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    from safetensors.numpy import load_file
    t = load_file(os.path.join(path, "model.safetensors"))
    g_idx = t["model.layers.1.mlp.experts.0.gate_proj.g_idx"]
    assert not np.all(np.diff(g_idx) >= 0)  # really scattered
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    assert layer.config["precision"] == "int4"
    check_held(layer, held, shared=True)
    # (the kernel rounds the rows per 32 in act-order's permuted order: the exact-rows check)
    check_forward(layer, c, held, tokens(c), tight=False)
    assert moe.inspect_pretrained(path)["expert_format"] == \
        "gptq int4 g32 asym act-order (v1 zeros)"


@pytest.mark.parametrize("group", [-1, 64])
def test_auto_gptq_v2_and_groups(tmp_path, group):
    path, c, held = make_int4(tmp_path, "mixtral", method="gptq", group=group, sym=False,
                              v1=False)
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    assert layer.config["precision"] == "int4"
    check_held(layer, held)
    check_forward(layer, c, held, tokens(c))


def test_auto_awq(tmp_path):
    path, c, held = make_int4(tmp_path, "mixtral", method="awq", group=32)
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    assert layer.config["precision"] == "int4"
    check_held(layer, held)
    check_forward(layer, c, held, tokens(c))
    assert moe.inspect_pretrained(path)["expert_format"] == "awq int4 g32 (gemm)"


@pytest.mark.parametrize("precision", ["auto", "fp8"])
def test_fp8_kept_as_stored(tmp_path, precision):
    # DeepSeek-V3's FP8: e4m3 with 128 x 128 block scales, the shared expert too; "auto" and
    # an explicit "fp8" hold the stored bytes (the held values are the stored ones exactly).
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                   "fmt": "e4m3", "activation_scheme": "dynamic"}}
    c = pf.tiny_config("deepseek_v3", **cfg)
    ws = {l: pf.random_weights(c, seed=l) for l in (1, 2)}
    path = str(tmp_path / "fp8")
    held = pf.write_folder(path, c, ws, fp8=(128, 128))[2]
    layer = moe.MoE.from_pretrained(path, 2, precision=precision)
    assert layer.config["precision"] == "fp8"
    check_held(layer, held, shared=True)
    check_forward(layer, c, held, tokens(c))
    info = moe.inspect_pretrained(path)
    assert info["auto_precision"] == "fp8" and info["expert_format"] == "fp8 e4m3 (block 128x128)"


def test_fp8_stacked_on_block_rows_kept(tmp_path):
    # The stacked gate_up (E, 2F, d) splits at F = 128: W3 starts on a block row.
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    c = pf.tiny_config("deepseek_v3", moe_intermediate_size=128, **cfg)
    ws = {2: pf.random_weights(c, seed=4)}
    path = str(tmp_path / "fp8s")
    held = pf.write_folder(path, c, ws, fp8=(128, 128), stacked=True)[2]
    layer = moe.MoE.from_pretrained(path, 2, precision="auto")
    check_held(layer, held, shared=True)
    check_forward(layer, c, held, tokens(c))


def test_fp8_other_blocks_converted(tmp_path):
    # 4 x 8 blocks are not the layer's 128 x 128: decoded and quantized again (fp8 still).
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 8]}}
    c = pf.tiny_config("deepseek_v3", **cfg)
    path = str(tmp_path / "fp8b")
    held = pf.write_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (1, 2)},
                           fp8=(4, 8))[2]
    layer = moe.MoE.from_pretrained(path, 2, precision="auto")
    assert layer.config["precision"] == "fp8"
    check_forward(layer, c, held, tokens(c), rel=5e-2, tight=False)  # re-quantized
    assert moe.inspect_pretrained(path)["expert_format"] == "fp8 e4m3 (block 4x8)"


@pytest.mark.parametrize("precision", ["auto", "mxfp4"])
def test_mxfp4_kept_as_stored(tmp_path, precision):
    # GPT-OSS: gate and up interleaved over the 2F rows, read as views with a doubled stride.
    c = pf.tiny_config("gpt_oss", quantization_config={
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                            "model.layers.*.mlp.router"]})
    path = str(tmp_path / "mx")
    held = pf.write_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (0, 1)},
                           stacked=True, mxfp4=True)[1]
    layer = moe.MoE.from_pretrained(path, 1, precision=precision)
    assert layer.config["precision"] == "mxfp4"
    check_held(layer, held)
    check_forward(layer, c, held, tokens(c) * 2)
    assert moe.inspect_pretrained(path)["expert_format"] == "mxfp4 (e2m1, e8m0 scale per 32)"


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_auto_on_plain_folder_is_bf16(tmp_path, dtype):
    c = pf.tiny_config("qwen2_moe")
    path = str(tmp_path / "plain")
    pf.write_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (0, 1)}, dtype=dtype)
    auto = moe.MoE.from_pretrained(path, 1, precision="auto")
    assert auto.config["precision"] == "bf16"
    x = tokens(c)
    np.testing.assert_array_equal(
        auto.forward(x), moe.MoE.from_pretrained(path, 1, precision="bf16").forward(x))
    info = moe.inspect_pretrained(path)
    assert info["auto_precision"] == "bf16" and info["expert_format"] == dtype.lower()


def test_torch_module_auto(tmp_path):
    torch = pytest.importorskip("torch")
    import moe.torch as mt
    path, c, held = make_int4(tmp_path, "olmoe", method="gptq", group=32)
    m = mt.MoE.from_pretrained(path, 1, precision="auto")
    x = tokens(c)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).numpy()
    ref, _ = pf.reference(c, held, x)
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


# ---- explicit precisions convert --------------------------------------------------------------

def test_gptq_to_bf16_and_fp32(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen2_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    x = tokens(c)
    check_forward(moe.MoE.from_pretrained(path, 1, precision="fp32"), c, held, x, rel=1e-5)
    layer = moe.MoE.from_pretrained(path, 1, precision="bf16")
    assert layer.config["precision"] == "bf16"
    check_forward(layer, c, held, x, rel=2e-2)


def test_awq_to_bf16(tmp_path):
    path, c, held = make_int4(tmp_path, "mixtral", method="awq", group=64)
    check_forward(moe.MoE.from_pretrained(path, 1, precision="bf16"), c, held, tokens(c),
                  rel=2e-2)


@pytest.mark.parametrize("src,precision", [("fp8", "int4"), ("fp8", "bf16"), ("bf16", "mxfp4"),
                                           ("bf16", "int4"), ("bf16", "fp8"), ("gptq", "fp8")])
def test_explicit_conversions(tmp_path, src, precision):
    if src == "fp8":
        c = pf.tiny_config("deepseek_v3", quantization_config={"quant_method": "fp8"})
        path = str(tmp_path / "f")
        held = pf.write_folder(path, c, {2: pf.random_weights(c, seed=2)}, fp8=(128, 128))[2]
        layer_idx = 2
    elif src == "gptq":
        path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32)
        layer_idx = 1
    else:
        c = int4_config("mixtral")
        path = str(tmp_path / "b")
        held = pf.write_folder(path, c, {1: pf.random_weights(c, seed=3)}, dtype="BF16")[1]
        layer_idx = 1
    layer = moe.MoE.from_pretrained(path, layer_idx, precision=precision)
    assert layer.config["precision"] == precision
    x = tokens(c)
    y = layer.forward(x)
    ref, _ = pf.reference(c, held, x)
    # Re-quantized by libmoe: the format's own error (int4 ~10%, mxfp4 ~12%, fp8 ~3%).
    bound = {"int4": 0.2, "mxfp4": 0.25, "fp8": 0.06, "bf16": 2e-2}[precision]
    assert rel_err(y, ref) < bound


# ---- modules kept unquantized ---------------------------------------------------------------

def test_modules_to_not_convert(tmp_path):
    # The shared expert listed as not converted (transformers' matching: a pattern from the
    # name's start to a "." boundary, or a suffix; "mlp.gate" is the router, not gate_proj):
    # its F16 .weight is read as plain weights.
    path, c, held = make_int4(tmp_path, "qwen2_moe", method="gptq", group=32,
                              not_converted=["model.layers.*.mlp.shared_expert", "mlp.gate"])
    from safetensors.numpy import load_file
    t = load_file(os.path.join(path, "model.safetensors"))
    assert "model.layers.1.mlp.shared_expert.up_proj.weight" in t
    check_forward(moe.MoE.from_pretrained(path, 1, precision="bf16"), c, held, tokens(c),
                  rel=2e-2)
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")  # routed experts: int4
    assert layer.config["precision"] == "int4"
    check_held(layer, held)  # routed experts as stored; the shared one quantized by libmoe
    assert moe.inspect_pretrained(path)["expert_format"] == \
        "gptq int4 g32 sym (v1 zeros); also f16"


def test_not_converted_matches_as_transformers(tmp_path):
    # AutoAWQ's MoE configs list "gate" (the router): a suffix of "mlp.gate", not of
    # "experts.0.gate_proj", which stays quantized.
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="awq", group=32)
    set_qconfig(path, modules_to_not_convert=["gate", "lm_head"])
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    check_held(layer, held)
    assert [pf.not_converted_by(m, ["gate"]) for m in
            ("model.layers.1.mlp.gate", "model.layers.1.mlp.experts.0.gate_proj")] == [True, False]


def test_dynamic_exclusion(tmp_path):
    # GPTQModel's dynamic: "-:regex" keeps the matching modules unquantized.
    q = pf.int4_config("gptq", 32, dynamic={r"-:.*shared_expert\.": {},
                                            r"+:.*experts\.0\.": {"group_size": 32}})
    path, c, held = make_int4(tmp_path, "qwen2_moe", method="gptq", group=32,
                              not_converted=["model.layers.*.mlp.shared_expert"], qconfig=q)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"].pop("modules_to_not_convert")
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    check_forward(moe.MoE.from_pretrained(path, 1, precision="bf16"), c, held, tokens(c),
                  rel=2e-2)


def test_PQ3_excluded_module_stored_quantized(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"]["modules_to_not_convert"] = ["experts.5.up_proj"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    m = err(path, "experts.5.up_proj.qweight' is quantized, but quantization_config."
                  "modules_to_not_convert lists 'experts.5.up_proj'")
    assert "experts.5.up_proj.weight" in m


# ---- moe inspect ------------------------------------------------------------------------------

def test_cli_inspect_names_the_format(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen2_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    out = subprocess.run([CLI, "inspect", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "experts as    gptq int4 g32 asym act-order (v1 zeros) (precision auto: int4)" \
        in out.stdout
    j = json.loads(subprocess.run([CLI, "inspect", path, "--json"], capture_output=True,
                                  text=True).stdout)
    assert j["auto_precision"] == "int4" and j["expert_format"].startswith("gptq int4 g32")
    c2 = pf.tiny_config("mixtral")
    p2 = str(tmp_path / "bf")
    pf.write_folder(p2, c2, {l: pf.random_weights(c2) for l in (0, 1)}, dtype="BF16")
    out = subprocess.run([CLI, "inspect", p2], capture_output=True, text=True)
    assert "experts as    bf16 (precision auto: bf16)" in out.stdout


# ---- errors: one line naming the tensor or the config key (docs/errors.md PQ1-PQ4) ----------

def err(path, match, layer=1, precision="auto"):
    with pytest.raises(moe.Error) as e:
        moe.MoE.from_pretrained(path, layer, precision=precision)
    m = str(e.value)
    assert "\n" not in m and match in m, m
    errors_doc.check(m)
    return m


def rewrite(path, fn):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f)


def set_qconfig(path, **kv):
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"].update(kv)
    json.dump(cfg, open(p, "w"))


MOD = "model.layers.1.mlp.experts.2.down_proj"


def test_PQ1_quantization_config_keys(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32)
    set_qconfig(path, bits=8)
    err(path, "quantization_config.bits is 8; libmoe reads 4-bit GPTQ and AWQ checkpoints only")
    set_qconfig(path, bits=4, group_size=48)
    err(path, "quantization_config.group_size is 48; it must be a positive multiple of 32 "
              "(or -1: one group)")
    set_qconfig(path, group_size=32, checkpoint_format="marlin")
    err(path, "quantization_config.checkpoint_format is 'marlin'")
    set_qconfig(path, checkpoint_format="gptq", sym="yes")
    err(path, "key 'quantization_config.sym' must be true or false")
    set_qconfig(path, sym=True, quant_method="bitsandbytes")
    err(path, "quantization_config.quant_method is 'bitsandbytes'; libmoe reads gptq, awq, fp8 "
              "and mxfp4 checkpoints")
    set_qconfig(path, quant_method="gptq", dynamic={"+:(": {}})
    err(path, "quantization_config.dynamic['+:('] is not a regular expression")
    set_qconfig(path, dynamic={}, modules_to_not_convert="gate")
    err(path, "key 'quantization_config.modules_to_not_convert' must be a list of module names")
    set_qconfig(path, modules_to_not_convert=["lm_head["])
    err(path, "must be a list of module names or patterns, got 'lm_head[' (not a regular "
              "expression)")
    # inspect reads the same config
    with pytest.raises(moe.Error, match="modules_to_not_convert"):
        moe.inspect_pretrained(path)
    path, c, held = make_int4(tmp_path, "mixtral", name="awq", method="awq", group=32)
    set_qconfig(path, version="gemv")
    err(path, "quantization_config.version is 'gemv'; libmoe reads AWQ's 'gemm' layout only")
    set_qconfig(path, version="GEMM", zero_point=False)
    err(path, "quantization_config.zero_point is false")
    set_qconfig(path, zero_point=True, group_size=None, q_group_size=None)
    err(path, "missing key 'quantization_config.group_size', which awq needs")


def test_PQ2_int4_tensors(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    orig = load_file(f)

    def case(fn, match, precision="auto"):
        t = dict(orig)
        fn(t)
        save_file(t, f)
        return err(path, match, precision=precision)

    case(lambda t: t.update({MOD + ".qweight": t[MOD + ".qweight"].astype(np.float32)}),
         f"tensor '{MOD}.qweight': packed int4 codes must be I32, got F32")
    case(lambda t: t.update({MOD + ".scales": t[MOD + ".scales"].astype(np.float32)}),
         f"tensor '{MOD}.scales': scales must be F16, got F32")
    case(lambda t: t.update({MOD + ".qweight": t[MOD + ".qweight"][:4].copy()}),
         f"tensor '{MOD}.qweight': expected shape [8, 64] (GPTQ qweight: in_features / 8, "
         "out_features), got [4, 64]")
    case(lambda t: t.update({MOD + ".qzeros": t[MOD + ".qzeros"][:1].copy()}),
         f"tensor '{MOD}.qzeros': expected shape [2, 8] (groups of 32, out_features / 8), got [1, 8]")
    case(lambda t: t.update({MOD + ".scales": t[MOD + ".scales"].T.copy()}),
         f"tensor '{MOD}.scales': expected shape [2, 64] (groups of 32, out_features), got [64, 2]")
    bad = orig[MOD + ".g_idx"].copy()
    bad[3] = 2
    case(lambda t: t.update({MOD + ".g_idx": bad}),
         f"tensor '{MOD}.g_idx': g_idx[3] = 2 is outside the 2 groups of the scales")
    uneven = np.zeros_like(bad)
    uneven[:8] = 1  # group 0 holds 56 rows
    case(lambda t: t.update({MOD + ".g_idx": uneven}),
         f"tensor '{MOD}.g_idx': GPTQ int4: g_idx puts 56 rows in group 0")
    case(lambda t: t.pop(MOD + ".g_idx"),
         f"has no '{MOD}.g_idx' beside it, which quantization_config.desc_act = true needs")
    case(lambda t: t.pop(MOD + ".qzeros"), f"tensor '{MOD}.qweight' has no '{MOD}.qzeros' beside it")
    case(lambda t: t.update({MOD + ".bias": np.ones(16, np.float16)}),
         f"tensor '{MOD}.bias': expected a bias of shape [64] (F16, BF16, F32)")
    case(lambda t: t.update({MOD + ".bias": np.ones(64, np.float16)}),
         f"tensor '{MOD}.bias': a non-zero bias, which this family's experts do not have")
    # A zero bias (AutoGPTQ writes one for Linear layers with bias) is accepted.
    t = dict(orig)
    t[MOD + ".bias"] = np.zeros(64, np.float16)
    save_file(t, f)
    moe.MoE.from_pretrained(path, 1, precision="auto")


def test_PQ4_int4_tensors_without_a_quantization_config(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32)
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    del cfg["quantization_config"]
    json.dump(cfg, open(p, "w"))
    err(path, "experts.0.gate_proj.qweight' is a GPTQ/AWQ tensor, but config.json's "
              "quantization_config.quant_method is 'none' (expected gptq or awq)")


# ---- mutations: anything the loader reads gives a layer or one moe.Error -----------------------

def test_mutated_int4_folders_load_or_refuse(tmp_path):
    """The loader's fuzz in small (fuzz/fuzz_pretrained.cpp fuzzes the config reader and the
    repacking in depth): a GPTQ and an AWQ folder with random bytes of their safetensors file
    changed (header and data), and quantization_config keys set to odd values, each load
    either builds a layer whose forward is finite-or-not but returns, or raises moe.Error on
    one line; nothing else escapes."""
    rng = np.random.default_rng(0)
    odd_values = [None, 0, -1, 3, 8, 48, 4096, 2**40, "4", "gemv", "marlin", True, [], {},
                  [1, 2], {"-:(": {}}, {"+:.*": {"bits": 3}}, 1.5]
    keys = ["bits", "group_size", "sym", "desc_act", "checkpoint_format", "version",
            "zero_point", "dynamic", "modules_to_not_convert", "quant_method", "w_bit",
            "q_group_size", "weight_block_size", "fmt", "is_marlin_format"]
    for method in ("gptq", "awq"):
        path, c, held = make_int4(tmp_path, "qwen3_moe", name=method, method=method, group=32,
                                  sym=False, act_order=method == "gptq")
        f = os.path.join(path, "model.safetensors")
        cfg_path = os.path.join(path, "config.json")
        data, cfg = open(f, "rb").read(), open(cfg_path).read()
        hlen = int.from_bytes(data[:8], "little")
        x = tokens(c, T=4)
        for trial in range(40):
            mutated, q = bytearray(data), json.loads(cfg)
            if trial % 2 == 0:  # bytes: a few in the header or in the data
                for _ in range(int(rng.integers(1, 4))):
                    at = int(rng.integers(8, 8 + hlen)) if rng.random() < 0.5 else \
                        int(rng.integers(8 + hlen, len(data)))
                    mutated[at] = int(rng.integers(0, 256))
            else:  # a config key
                k = keys[int(rng.integers(len(keys)))]
                q["quantization_config"][k] = odd_values[int(rng.integers(len(odd_values)))]
            open(f, "wb").write(bytes(mutated))
            json.dump(q, open(cfg_path, "w"))
            try:
                layer = moe.MoE.from_pretrained(path, 1, precision="auto")
                layer.forward(x)
            except moe.Error as e:
                assert "\n" not in str(e)
        open(f, "wb").write(data)
        open(cfg_path, "w").write(cfg)


# ---- quantize_config.json: AutoGPTQ's settings file, older than quantization_config ------------

def to_quantize_config(path, keep_config=False, drop=("quant_method", "checkpoint_format"),
                       **over):
    """Writes config.json's quantization_config into quantize_config.json as AutoGPTQ wrote it
    (no quant_method or checkpoint_format unless `drop` keeps them; true_sequential,
    model_file_base_name beside the values), removed from config.json unless keep_config."""
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    q = {k: v for k, v in cfg["quantization_config"].items() if k not in drop}
    q.update({"true_sequential": True, "model_file_base_name": "model", "static_groups": False})
    q.update(over)
    if not keep_config:
        del cfg["quantization_config"]
    json.dump(cfg, open(p, "w"))
    json.dump(q, open(os.path.join(path, "quantize_config.json"), "w"))
    return q


@pytest.mark.parametrize("drop", [("quant_method", "checkpoint_format"), ()])
def test_gptq_settings_in_quantize_config_json(tmp_path, drop):
    # asym, act-order, v1 zero points: every setting that changes the values read, taken from
    # quantize_config.json alone gives the layer the same folder with quantization_config gives.
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    x = tokens(c)
    want = moe.MoE.from_pretrained(path, 1, precision="auto").forward(x, training=False)
    want_bf16 = moe.MoE.from_pretrained(path, 1, precision="bf16").forward(x, training=False)
    want_info = moe.inspect_pretrained(path)
    to_quantize_config(path, drop=drop)
    assert "quantization_config" not in json.load(open(os.path.join(path, "config.json")))
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    assert layer.config["precision"] == "int4" and not layer.holds_masters
    check_held(layer, held)
    np.testing.assert_array_equal(layer.forward(x, training=False), want)
    np.testing.assert_array_equal(
        moe.MoE.from_pretrained(path, 1, precision="bf16").forward(x, training=False), want_bf16)
    info = moe.inspect_pretrained(path)
    assert info["auto_precision"] == "int4"
    assert info["expert_format"] == want_info["expert_format"] == \
        "gptq int4 g32 asym act-order (v1 zeros)"
    out = subprocess.run([CLI, "inspect", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "experts as    gptq int4 g32 asym act-order (v1 zeros) (precision auto: int4)" \
        in out.stdout


def test_gptq_v2_in_quantize_config_json(tmp_path):
    path, c, held = make_int4(tmp_path, "mixtral", method="gptq", group=64, v1=False)
    x = tokens(c)
    want = moe.MoE.from_pretrained(path, 1, precision="auto").forward(x, training=False)
    to_quantize_config(path, drop=("quant_method",))  # checkpoint_format gptq_v2 kept
    layer = moe.MoE.from_pretrained(path, 1, precision="auto")
    np.testing.assert_array_equal(layer.forward(x, training=False), want)
    assert moe.inspect_pretrained(path)["expert_format"] == "gptq int4 g64 sym (v2 zeros)"


def test_quantize_config_json_beside_an_agreeing_quantization_config(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    x = tokens(c)
    want = moe.MoE.from_pretrained(path, 1, precision="auto").forward(x, training=False)
    # the same values, sym and desc_act left to their defaults where they are the default
    to_quantize_config(path, keep_config=True, drop=("quant_method",))
    np.testing.assert_array_equal(
        moe.MoE.from_pretrained(path, 1, precision="auto").forward(x, training=False), want)


@pytest.mark.parametrize("key,value,shown", [("bits", 8, "4"), ("group_size", 64, "32"),
                                             ("sym", True, "false"), ("desc_act", False, "true")])
def test_PQ5_quantize_config_json_disagrees(tmp_path, key, value, shown):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32, sym=False,
                              act_order=True)
    to_quantize_config(path, keep_config=True, **{key: value})
    v = json.dumps(value)
    m = err(path, f"config.json of '{path}': quantization_config.{key} is {shown}, but "
                  f"quantize_config.json of '{path}' has {key} = {v}; the two files must agree")
    with pytest.raises(moe.Error, match="the two files must agree"):
        moe.inspect_pretrained(path)
    assert m.count("config.json") == 2


def test_PQ5_quantize_config_json_malformed(tmp_path):
    path, c, held = make_int4(tmp_path, "qwen3_moe", method="gptq", group=32)
    q = to_quantize_config(path)
    qpath = os.path.join(path, "quantize_config.json")
    what = f"quantize_config.json of '{path}'"

    def case(text, match):
        with open(qpath, "w") as f:
            f.write(text if isinstance(text, str) else json.dumps(text))
        m = err(path, what + ": " + match)
        with pytest.raises(moe.Error, match="quantize_config.json"):
            moe.inspect_pretrained(path)
        out = subprocess.run([CLI, "inspect", path], capture_output=True, text=True)
        assert out.returncode == 2 and m in out.stderr, out.stderr
        return m

    case([q], "expected a JSON object, got array")
    case('"gptq"', "expected a JSON object, got string")
    case('{"bits": 4,', "the file is not valid JSON")
    for key, value, words in [("bits", "4", "an integer"), ("group_size", 32.5, "an integer"),
                              ("sym", "yes", "true or false"), ("desc_act", 1, "true or false"),
                              ("true_sequential", "y", "true or false"),
                              ("model_file_base_name", 3, "a string"),
                              ("checkpoint_format", 2, "a string"),
                              ("quant_method", ["gptq"], "a string")]:
        case(dict(q, **{key: value}), f"key '{key}' must be {words}, got {json.dumps(value)}")
    # Values refused as in config.json's quantization_config, named by their key in this file.
    case(dict(q, bits=8), "bits is 8; libmoe reads 4-bit GPTQ and AWQ checkpoints only")
    case(dict(q, group_size=48), "group_size is 48; it must be a positive multiple of 32 "
                                 "(or -1: one group)")
    case(dict(q, checkpoint_format="marlin"), "checkpoint_format is 'marlin'; libmoe reads "
                                              "'gptq' (v1: zero points stored minus 1) and 'gptq_v2'")
    case({k: v for k, v in q.items() if k != "group_size"},
         "missing key 'group_size', which gptq needs")
    # The folder's tensors are held to the settings this file gives.
    with open(qpath, "w") as f:
        json.dump(dict(q, desc_act=True), f)
    err(path, "' beside it, which quantize_config.json's desc_act = true needs")
    with open(qpath, "w") as f:
        json.dump(dict(q, quant_method="fp8"), f)
    err(path, "is a GPTQ/AWQ tensor, but quantize_config.json's quant_method is 'fp8' "
              "(expected gptq or awq)")
