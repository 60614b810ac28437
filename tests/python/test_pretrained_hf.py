"""moe.MoE.from_pretrained against transformers' own modules (docs/spec.md §7, docs/models.md).

For each family a tiny model is built in code (no downloads), given random weights, and
written to a folder the way real checkpoints are: `save_pretrained` (the published per-expert
names), the stacked layout transformers 5 holds in memory (`experts.gate_up_proj` /
`experts.down_proj`), sharded with an index, in fp32, bf16 and fp16, and for DeepSeek-V3 and
GPT-OSS in their quantised formats (FP8 e4m3 with 128×128 block scales, MXFP4). The block
loaded by libmoe must choose the same experts as the family's module in transformers and give
its output to fp32 rounding (1e-5 relative), or to 2e-2 in bf16.

The oracle is always transformers' module itself, run in fp32 on the weights the file holds
(for the quantised formats: dequantised by torch's float8 type, or by transformers' own MXFP4
decoder)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moe  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False)


def make_config(family, **over):
    c = dict(COMMON)
    if family == "mixtral":
        c.update(num_local_experts=8, num_experts_per_tok=2)
        cfg = transformers.MixtralConfig(**{**c, **over})
    elif family == "qwen2_moe":
        c.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=80, norm_topk_prob=False, decoder_sparse_step=1)
        cfg = transformers.Qwen2MoeConfig(**{**c, **over})
    elif family == "qwen3_moe":
        c.update(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                 norm_topk_prob=True, decoder_sparse_step=1, head_dim=16)
        cfg = transformers.Qwen3MoeConfig(**{**c, **over})
    elif family == "olmoe":
        c.update(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
        cfg = transformers.OlmoeConfig(**{**c, **over})
    elif family == "deepseek_v2":
        c.update(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                 n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2,
                 topk_method="group_limited_greedy", routed_scaling_factor=1.5)
        cfg = transformers.DeepseekV2Config(**{**c, **over})
    elif family == "deepseek_v3":
        c.update(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                 n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, norm_topk_prob=True)
        cfg = transformers.DeepseekV3Config(**{**c, **over})
    elif family == "gpt_oss":
        c.update(num_local_experts=8, num_experts_per_tok=2, head_dim=16, intermediate_size=64)
        cfg = transformers.GptOssConfig(**{**c, **over})
    elif family == "granitemoe":
        c.update(num_local_experts=8, num_experts_per_tok=2)
        cfg = transformers.GraniteMoeConfig(**{**c, **over})
    else:
        raise AssertionError(family)
    return cfg


def moe_block(model, layer):
    dec = model.model.layers[layer]
    return dec.mlp if hasattr(dec, "mlp") else dec.block_sparse_moe


def build(family, seed=0, **over):
    """A tiny causal LM of `family` with random weights of order one in its MoE blocks (so
    that routing is decided by the inputs and no expert output is negligible)."""
    cfg = make_config(family, **over)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            block = moe_block(model, layer)
            for name, p in block.named_parameters():
                d_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / max(d_in, 1) ** 0.5)
            for name, b in block.named_buffers():
                if "e_score_correction_bias" in name:
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def moe_layers(family, cfg):
    first = getattr(cfg, "first_k_dense_replace", 0)
    return [i for i in range(cfg.num_hidden_layers) if i >= first]


def hf_forward(block, x):
    """The module's output for x (T, d) and the experts it chose, as sorted rows."""
    seen = {}

    def hook(_mod, args):
        seen["idx"] = args[1].detach().clone()

    h = block.experts.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            y = block(x[None])
    finally:
        h.remove()
    if isinstance(y, tuple):  # gpt_oss returns (output, router logits)
        y = y[0]
    y = y.reshape(x.shape[0], -1)
    return y.float().numpy(), np.sort(seen["idx"].numpy(), axis=1)


def ours(path, layer, x, precision="fp32"):
    m = moe.MoE.from_pretrained(str(path), layer, precision=precision)
    y = m.forward(x.numpy(), training=False)
    return m, y, np.sort(np.asarray(m.routing.indices), axis=1)


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def rel_fro(a, b):
    """Relative Frobenius error: the low-bit kernels round their rows (int8 per 32 values or
    bf16) in both products of an expert (docs/models.md, "Stored formats")."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def save_stacked(model, path, dtype=torch.float32):
    """The layout transformers 5 holds in memory (fused experts), written as it is."""
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(sd, os.path.join(path, "model.safetensors"),
                                metadata={"format": "pt"})
    model.config.save_pretrained(path)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss", "granitemoe"]


def tokens(d, T=37, seed=5):
    return torch.randn(T, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["published", "stacked"])
def test_block_equals_transformers_fp32(family, layout, tmp_path):
    model = build(family)
    if layout == "published":
        model.save_pretrained(tmp_path)
    else:
        save_stacked(model, tmp_path)
    x = tokens(model.config.hidden_size)
    for layer in moe_layers(family, model.config):
        y_ref, idx_ref = hf_forward(moe_block(model, layer), x)
        _, y, idx = ours(tmp_path, layer, x)
        np.testing.assert_array_equal(idx, idx_ref, err_msg=f"{family} layer {layer}")
        assert rel(y, y_ref) < 1e-5, (family, layer, rel(y, y_ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_bf16_precision(family, tmp_path):
    """precision="bf16" (the loader's default): same experts as the fp32 module (the router is
    fp32), output to bf16 rounding."""
    model = build(family)
    model.save_pretrained(tmp_path)
    x = tokens(model.config.hidden_size)
    layer = moe_layers(family, model.config)[-1]
    y_ref, idx_ref = hf_forward(moe_block(model, layer), x)
    m = moe.MoE.from_pretrained(str(tmp_path), layer)  # bf16 by default
    assert m.config["precision"] == "bf16"
    y = m.forward(x.numpy(), training=False)
    np.testing.assert_array_equal(np.sort(np.asarray(m.routing.indices), axis=1), idx_ref)
    assert rel(y, y_ref) < 2e-2, rel(y, y_ref)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files(family, dtype, tmp_path):
    """A checkpoint stored in bf16 or fp16, loaded in fp32: equal to the module holding the
    same (rounded) weights in fp32."""
    model = build(family)
    model.to(dtype).save_pretrained(tmp_path)
    model.float()  # the rounded weights, back in fp32: the oracle
    x = tokens(model.config.hidden_size)
    layer = moe_layers(family, model.config)[-1]
    y_ref, idx_ref = hf_forward(moe_block(model, layer), x)
    _, y, idx = ours(tmp_path, layer, x)
    np.testing.assert_array_equal(idx, idx_ref)
    assert rel(y, y_ref) < 1e-5, rel(y, y_ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_sharded_folder(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    x = tokens(model.config.hidden_size)
    for layer in moe_layers(family, model.config):
        y_ref, idx_ref = hf_forward(moe_block(model, layer), x)
        _, y, idx = ours(tmp_path, layer, x)
        np.testing.assert_array_equal(idx, idx_ref)
        assert rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("family,norm", [("qwen3_moe", False), ("olmoe", True),
                                         ("qwen2_moe", True), ("deepseek_v3", False)])
def test_norm_topk_prob_both_ways(family, norm, tmp_path):
    model = build(family, norm_topk_prob=norm)
    model.save_pretrained(tmp_path)
    x = tokens(model.config.hidden_size)
    layer = moe_layers(family, model.config)[-1]
    y_ref, idx_ref = hf_forward(moe_block(model, layer), x)
    _, y, idx = ours(tmp_path, layer, x)
    np.testing.assert_array_equal(idx, idx_ref)
    assert rel(y, y_ref) < 1e-5


def test_deepseek_v2_greedy(tmp_path):
    model = build("deepseek_v2", topk_method="greedy", n_group=1, topk_group=1)
    model.save_pretrained(tmp_path)
    x = tokens(model.config.hidden_size)
    y_ref, idx_ref = hf_forward(moe_block(model, 2), x)
    _, y, idx = ours(tmp_path, 2, x)
    np.testing.assert_array_equal(idx, idx_ref)
    assert rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("family,dense", [("deepseek_v3", 0), ("deepseek_v2", 0)])
def test_dense_layer_is_a_clear_error(family, dense, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"layer\W+{dense}\b.*dense.*nearest MoE layers.*\b1\b"):
        moe.MoE.from_pretrained(str(tmp_path), dense)


def test_qwen2_mlp_only_layers(tmp_path):
    model = build("qwen2_moe", mlp_only_layers=[1])
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer\W+1\b.*dense.*nearest MoE layers.*\b(0|2)\b"):
        moe.MoE.from_pretrained(str(tmp_path), 1)
    x = tokens(model.config.hidden_size)
    y_ref, idx_ref = hf_forward(moe_block(model, 2), x)
    _, y, idx = ours(tmp_path, 2, x)
    np.testing.assert_array_equal(idx, idx_ref)
    assert rel(y, y_ref) < 1e-5


# ---- Quantised formats ---------------------------------------------------------------------


def fp8_block_quantize(w, block=128):
    """(out, in) fp32 → (e4m3 weight, fp32 scale_inv of ceil(out/128) × ceil(in/128)) as
    DeepSeek-V3 stores them: w ≈ q · scale_inv per 128×128 block."""
    o, i = w.shape
    so, si = -(-o // block), -(-i // block)
    scale = torch.empty(so, si)
    q = torch.empty(o, i, dtype=torch.float8_e4m3fn)
    for a in range(so):
        for b in range(si):
            blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[a, b] = s
            q[a * block:(a + 1) * block, b * block:(b + 1) * block] = (blk / s).to(
                torch.float8_e4m3fn)
    return q, scale


def fp8_dequantize(q, scale, block=128):
    s = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:q.shape[0], :q.shape[1]]
    return q.float() * s


def test_deepseek_v3_fp8(tmp_path):
    """FP8 (e4m3) expert and shared-expert weights with 128×128 block scales, as published
    DeepSeek-V3 checkpoints store them; dims that are not multiples of 128 give partial
    blocks. The oracle holds torch's dequantisation of the same bytes."""
    model = build("deepseek_v3", hidden_size=192, moe_intermediate_size=160,
                  intermediate_size=96)
    model.save_pretrained(tmp_path)
    # Rewrite the published file: every 2-D projection weight of the MoE blocks in FP8.
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert files == ["model.safetensors"]
    sd = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    out = {}
    for name, w in sd.items():
        if ".mlp." in name and name.endswith("_proj.weight") and w.dim() == 2:
            q, s = fp8_block_quantize(w.float())
            out[name] = q
            out[name + "_scale_inv"] = s
            sd[name] = fp8_dequantize(q, s)  # what the oracle will hold
        else:
            out[name] = w
    safetensors_torch.save_file(out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                                  "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # Load the dequantised weights into the oracle through transformers' own loading path
    # (published names → its fused in-memory layout).
    ref_dir = tmp_path / "oracle"
    model.save_pretrained(ref_dir)
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    oracle = transformers.AutoModelForCausalLM.from_pretrained(ref_dir).float().eval()
    x = tokens(192)
    for layer in moe_layers("deepseek_v3", oracle.config):
        y_ref, idx_ref = hf_forward(moe_block(oracle, layer), x)
        _, y, idx = ours(tmp_path, layer, x)
        np.testing.assert_array_equal(idx, idx_ref)
        assert rel(y, y_ref) < 1e-5, rel(y, y_ref)
        # precision="auto": the FP8 bytes as stored, products on bf16 rows.
        m, y, idx = ours(tmp_path, layer, x, "auto")
        assert m.config["precision"] == "fp8"
        np.testing.assert_array_equal(idx, idx_ref)
        assert rel_fro(y, y_ref) < 3e-2, rel_fro(y, y_ref)


def test_gpt_oss_mxfp4(tmp_path):
    """MXFP4 experts as GPT-OSS publishes them: `*_blocks` (E, rows, in/32, 16) bytes of two
    e2m1 values each and `*_scales` (E, rows, in/32) e8m0 exponents. The oracle's weights come
    from transformers' own MXFP4 decoder."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = build("gpt_oss")
    model.save_pretrained(tmp_path)
    sd = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    cfg = model.config
    E, d, F = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(9)
    out, ref = dict(sd), dict(sd)
    for layer in range(cfg.num_hidden_layers):
        for proj, rows, cols in (("gate_up_proj", 2 * F, d), ("down_proj", d, F)):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=g,
                                   dtype=torch.uint8)
            # exponents around 2^-3 so that products stay of order one
            scales = torch.randint(121, 126, (E, rows, cols // 32), generator=g,
                                   dtype=torch.uint8)
            del out[name]
            out[name + "_blocks"] = blocks
            out[name + "_scales"] = scales
            ref[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert ref[name].shape == (E, cols, rows)
    safetensors_torch.save_file(out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "mxfp4",
                                   "modules_to_not_convert": ["model.layers.*.self_attn",
                                                              "model.layers.*.mlp.router",
                                                              "model.embed_tokens", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            ex = moe_block(model, layer).experts
            ex.gate_up_proj.copy_(ref[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
            ex.down_proj.copy_(ref[f"model.layers.{layer}.mlp.experts.down_proj"])
    x = tokens(d)
    for layer in range(cfg.num_hidden_layers):
        y_ref, idx_ref = hf_forward(moe_block(model, layer), x)
        _, y, idx = ours(tmp_path, layer, x)
        np.testing.assert_array_equal(idx, idx_ref)
        assert rel(y, y_ref) < 1e-5, rel(y, y_ref)
        # precision="auto": the MXFP4 bytes as stored, products on int8 (or bf16) rows.
        m, y, idx = ours(tmp_path, layer, x, "auto")
        assert m.config["precision"] == "mxfp4"
        np.testing.assert_array_equal(idx, idx_ref)
        assert rel_fro(y, y_ref) < 3e-2, rel_fro(y, y_ref)


# ---- moe.torch and the routing-given entry point -------------------------------------------


def test_torch_module_from_pretrained(tmp_path):
    mt = pytest.importorskip("moe.torch")
    model = build("qwen2_moe")
    model.save_pretrained(tmp_path)
    x = tokens(model.config.hidden_size)
    y_ref, _ = hf_forward(moe_block(model, 1), x)
    m = mt.MoE.from_pretrained(str(tmp_path), 1, precision="fp32").eval()
    with torch.no_grad():
        y = m(x[None]).reshape(x.shape[0], -1).numpy()
    assert rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_with_given_routing(family, tmp_path):
    """The experts alone, routed by the caller (transformers' experts interface): fed the
    module's own indices and weights, they give the module's experts output."""
    model = build(family)
    model.save_pretrained(tmp_path)
    block = moe_block(model, 1)
    x = tokens(model.config.hidden_size)
    seen = {}

    def hook(_mod, args, out):
        seen["args"] = [a.detach().clone() for a in args]
        seen["out"] = out.detach().clone()

    h = block.experts.register_forward_hook(hook)
    with torch.no_grad():
        block(x[None])
    h.remove()
    if isinstance(seen["out"], tuple):
        seen["out"] = seen["out"][0]
    _, idx, w = seen["args"]
    m = moe.MoE.from_pretrained(str(tmp_path), 1, precision="fp32")
    y = m.experts_forward(x.numpy(), idx.numpy(), w.float().numpy())
    assert rel(y, seen["out"].numpy()) < 1e-5


def test_gpt_oss_clamps_active(tmp_path):
    """A small swiglu_limit so that the gate and up clamps bite on many entries."""
    model = build("gpt_oss", swiglu_limit=0.6)
    model.save_pretrained(tmp_path)
    x = 3 * tokens(model.config.hidden_size)
    block = moe_block(model, 1)
    with torch.no_grad():  # the clamps are really exercised
        gu = x @ block.experts.gate_up_proj[0] + block.experts.gate_up_proj_bias[0]
    assert (gu[:, ::2] > 0.6).float().mean() > 0.1 and (gu[:, 1::2].abs() > 0.6).float().mean() > 0.1
    y_ref, idx_ref = hf_forward(block, x)
    _, y, idx = ours(tmp_path, 1, x)
    np.testing.assert_array_equal(idx, idx_ref)
    assert rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("family,layout", [("mixtral", "published"), ("gpt_oss", "published"),
                                           ("qwen2_moe", "stacked"), ("granitemoe", "published")])
def test_bf16_file_packed_as_is(family, layout, tmp_path):
    """A bf16 file loaded in bf16 is packed from its bytes as they are (no decoding); the same
    values stored as F32 go through the decoding path. Both must give the same bits, in every
    tensor layout (per-expert (out, in), stacked gate/up halves, GPT-OSS's interleaved
    (in, out))."""
    model = build(family).to(torch.bfloat16)
    save = model.save_pretrained if layout == "published" else None
    a, b = tmp_path / "bf16", tmp_path / "f32"
    if layout == "published":
        model.save_pretrained(a)
        model.float().save_pretrained(b)
    else:
        save_stacked(model, a, torch.bfloat16)
        save_stacked(model.float(), b, torch.float32)
    x = tokens(model.config.hidden_size).numpy()
    layer = moe_layers(family, model.config)[-1]
    ya = moe.MoE.from_pretrained(str(a), layer, precision="bf16").forward(x, training=False)
    yb = moe.MoE.from_pretrained(str(b), layer, precision="bf16").forward(x, training=False)
    np.testing.assert_array_equal(ya, yb)
    assert np.abs(ya).max() > 0.1
