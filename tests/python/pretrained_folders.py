"""Hand-written Hugging Face model folders for the pretrained loader's tests, and the float64
reference of each family's MoE block (plain NumPy, written from the transformers modeling code
of each family, independently of the C++ loader).

Weights are kept in one canonical form (nn.Linear orientation, "out x in"):
  router (E, d), router_bias (E), e_bias (E), gate / up (E, F, d), down (E, d, F),
  bg / bu (E, F), bd (E, d) (gpt_oss), sgate / sup (Fs, d), sdown (d, Fs), sgw (1, d) (shared).
`write_folder` lays them out under a family's checkpoint names (per-expert or stacked) in
the dtype asked for; `reference` computes the block's output from the values as stored.
"""
import json
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss", "granitemoe"]


def tiny_config(family, **over):
    """A small config.json of each family (2 decoder layers unless said otherwise)."""
    d, E, k, F = 16, 8, 2, 8
    c = {"model_type": family, "hidden_size": d, "num_hidden_layers": 2, "hidden_act": "silu",
         "num_experts_per_tok": k}
    if family == "mixtral":
        c.update(num_local_experts=E, intermediate_size=F)
    elif family in ("qwen2_moe", "qwen3_moe"):
        c.update(num_experts=E, moe_intermediate_size=F, norm_topk_prob=(family == "qwen3_moe"),
                 decoder_sparse_step=1, mlp_only_layers=[])
        if family == "qwen2_moe":
            c.update(shared_expert_intermediate_size=12)
    elif family == "olmoe":
        c.update(num_experts=E, intermediate_size=F, norm_topk_prob=False)
    elif family == "deepseek_v2":
        c.update(n_routed_experts=E, moe_intermediate_size=F, n_shared_experts=2,
                 routed_scaling_factor=1.5, topk_method="group_limited_greedy", n_group=4,
                 topk_group=2, first_k_dense_replace=1, num_hidden_layers=3,
                 intermediate_size=24)
    elif family == "deepseek_v3":
        c.update(n_routed_experts=E, moe_intermediate_size=F, n_shared_experts=1,
                 routed_scaling_factor=2.5, n_group=4, topk_group=2, norm_topk_prob=True,
                 first_k_dense_replace=1, num_hidden_layers=3, intermediate_size=24)
    elif family == "gpt_oss":
        d, F = 32, 32
        c.update(hidden_size=d, num_local_experts=E, intermediate_size=F, swiglu_limit=7.0,
                 swiglu_alpha=1.702)
    elif family == "granitemoe":
        c.update(num_local_experts=E, intermediate_size=F)
    c.update(over)
    return c


def dims(c):
    d = c["hidden_size"]
    E = c.get("num_local_experts", c.get("num_experts", c.get("n_routed_experts")))
    F = c.get("moe_intermediate_size", c.get("intermediate_size"))
    return d, E, F


def random_weights(c, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    d, E, F = dims(c)
    fam = c["model_type"]
    w = {"router": rng.standard_normal((E, d)) * scale,
         "gate": rng.standard_normal((E, F, d)) / math.sqrt(d),
         "up": rng.standard_normal((E, F, d)) / math.sqrt(d),
         "down": rng.standard_normal((E, d, F)) / math.sqrt(F)}
    if fam == "gpt_oss":
        w["router_bias"] = rng.standard_normal(E) * 0.1
        w["bg"] = rng.standard_normal((E, F)) * 0.1
        w["bu"] = rng.standard_normal((E, F)) * 0.1
        w["bd"] = rng.standard_normal((E, d)) * 0.1
        w["gate"] *= 4  # reach the clamp at 7 now and then
        w["up"] *= 4
    if fam == "deepseek_v3":
        w["e_bias"] = rng.standard_normal(E) * 0.5
    Fs = {"qwen2_moe": c.get("shared_expert_intermediate_size", 0),
          "deepseek_v2": F * c.get("n_shared_experts", 0),
          "deepseek_v3": F * c.get("n_shared_experts", 0)}.get(fam, 0)
    if Fs:
        w["sgate"] = rng.standard_normal((Fs, d)) / math.sqrt(d)
        w["sup"] = rng.standard_normal((Fs, d)) / math.sqrt(d)
        w["sdown"] = rng.standard_normal((d, Fs)) / math.sqrt(Fs)
    if fam == "qwen2_moe":
        w["sgw"] = rng.standard_normal((1, d)) / math.sqrt(d)
    return w


# ---- quantised formats (what the files hold, and the values they mean) ----------------------

FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
              -6.0]


def mxfp4_random(shape_out_in, rng):
    """Random MXFP4 data for a logical (..., rows, cols) matrix: blocks (..., rows, cols/32, 16)
    U8 and scales (..., rows, cols/32) U8; returns (blocks, scales, values as float64)."""
    *lead, R, C = shape_out_in
    G = C // 32
    blocks = rng.integers(0, 256, size=(*lead, R, G, 16), dtype=np.uint8)
    scales = rng.integers(122, 129, size=(*lead, R, G), dtype=np.uint8)
    lut = np.array(FP4_VALUES)
    vals = np.empty((*lead, R, G, 32))
    vals[..., 0::2] = lut[blocks & 0x0F]
    vals[..., 1::2] = lut[blocks >> 4]
    vals *= np.exp2(scales.astype(np.float64) - 127.0)[..., None]
    return blocks, scales, vals.reshape(*lead, R, G * 32)


def fp8_quantize(w, block):
    """w (..., R, C) float64 -> (F8_E4M3 tensor, scale_inv (..., ceil(R/br), ceil(C/bc)) fp32,
    the values they mean)."""
    br, bc = block
    *lead, R, C = w.shape
    nr, nc = -(-R // br), -(-C // bc)
    scale = np.empty((*lead, nr, nc))
    full = np.empty_like(w)
    for i in range(nr):
        for j in range(nc):
            blk = w[..., i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = np.abs(blk).max(axis=(-1, -2)) / 448.0 + 1e-12
            scale[..., i, j] = s
            full[..., i * br:(i + 1) * br, j * bc:(j + 1) * bc] = s[..., None, None]
    q = torch.from_numpy(w / full).to(torch.float8_e4m3fn)
    scale32 = scale.astype(np.float32)
    full32 = np.empty_like(w)
    for i in range(nr):
        for j in range(nc):
            full32[..., i * br:(i + 1) * br, j * bc:(j + 1) * bc] = \
                scale32[..., i, j].astype(np.float64)[..., None, None]
    return q, torch.from_numpy(scale32), q.to(torch.float64).numpy() * full32


TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                "F64": torch.float64}


def as_stored(a, dtype):
    """(torch tensor in dtype, the float64 values it holds)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(TORCH_DTYPES[dtype])
    return t, t.to(torch.float64).numpy()


# ---- the checkpoint's names --------------------------------------------------------------------

def block_prefix(fam, layer, stacked):
    if fam == "mixtral":
        return f"model.layers.{layer}.{'mlp' if stacked else 'block_sparse_moe'}."
    if fam == "granitemoe":
        return f"model.layers.{layer}.block_sparse_moe."
    return f"model.layers.{layer}.mlp."


def write_folder(path, c, weights_by_layer, dtype="F32", stacked=False, shards=1, fp8=None,
                 mxfp4=False, seed=1):
    """Writes config.json and the MoE blocks of the given layers. Returns, per layer, the
    weights as the files hold them (float64), for the reference.

    dtype: F32 | BF16 | F16 for the plain weights; fp8=(br, bc): expert and shared matrices
    as F8_E4M3 with `_scale_inv` (deepseek_v3); mxfp4: gpt_oss experts as _blocks/_scales."""
    os.makedirs(path, exist_ok=True)
    fam = c["model_type"]
    rng = np.random.default_rng(seed)
    tensors = {}
    held = {}

    def put(name, a, kind="plain"):
        if kind == "fp8" and fp8:
            q, s, vals = fp8_quantize(a, fp8)
            tensors[name] = q
            tensors[name + "_scale_inv"] = s
            return vals
        t, vals = as_stored(a, dtype)
        tensors[name] = t
        return vals

    for layer, w in weights_by_layer.items():
        d, E, F = dims(c)
        pre = block_prefix(fam, layer, stacked)
        h = dict(w)
        router = {"mixtral": "gate", "gpt_oss": "router",
                  "granitemoe": "router.weight" if stacked else "router.layer"}.get(fam, "gate")
        if fam == "granitemoe" and stacked:
            h["router"] = put(pre + "router.weight", w["router"])
        else:
            h["router"] = put(pre + router + ".weight", w["router"])
        if "router_bias" in w:
            h["router_bias"] = put(pre + "router.bias", w["router_bias"])
        if "e_bias" in w:
            tensors[pre + "gate.e_score_correction_bias"] = torch.from_numpy(
                w["e_bias"].astype(np.float32))
            h["e_bias"] = w["e_bias"].astype(np.float32).astype(np.float64)
        if fam == "gpt_oss":
            if mxfp4:
                b, s, vals = mxfp4_random((E, 2 * F, d), rng)
                tensors[pre + "experts.gate_up_proj_blocks"] = torch.from_numpy(b)
                tensors[pre + "experts.gate_up_proj_scales"] = torch.from_numpy(s)
                h["gate"], h["up"] = vals[:, 0::2, :], vals[:, 1::2, :]
                b, s, vals = mxfp4_random((E, d, F), rng)
                tensors[pre + "experts.down_proj_blocks"] = torch.from_numpy(b)
                tensors[pre + "experts.down_proj_scales"] = torch.from_numpy(s)
                h["down"] = vals
            else:
                gu = np.empty((E, d, 2 * F))
                gu[:, :, 0::2] = w["gate"].transpose(0, 2, 1)
                gu[:, :, 1::2] = w["up"].transpose(0, 2, 1)
                gu = put(pre + "experts.gate_up_proj", gu)
                h["gate"] = gu[:, :, 0::2].transpose(0, 2, 1)
                h["up"] = gu[:, :, 1::2].transpose(0, 2, 1)
                h["down"] = put(pre + "experts.down_proj",
                                w["down"].transpose(0, 2, 1)).transpose(0, 2, 1)
            gub = np.empty((E, 2 * F))
            gub[:, 0::2], gub[:, 1::2] = w["bg"], w["bu"]
            gub = put(pre + "experts.gate_up_proj_bias", gub)
            h["bg"], h["bu"] = gub[:, 0::2], gub[:, 1::2]
            h["bd"] = put(pre + "experts.down_proj_bias", w["bd"])
        elif stacked or fam == "granitemoe":
            gu_name, dn_name = ("input_linear.weight", "output_linear.weight") \
                if fam == "granitemoe" and not stacked else \
                ("experts.gate_up_proj", "experts.down_proj")
            gu = put(pre + gu_name, np.concatenate([w["gate"], w["up"]], axis=1), "fp8")
            h["gate"], h["up"] = gu[:, :F], gu[:, F:]
            h["down"] = put(pre + dn_name, w["down"], "fp8")
        else:
            names = ("w1", "w3", "w2") if fam == "mixtral" else ("gate_proj", "up_proj",
                                                                  "down_proj")
            for key, n in zip(("gate", "up", "down"), names):
                h[key] = np.stack([put(f"{pre}experts.{e}.{n}.weight", w[key][e], "fp8")
                                   for e in range(E)])
        if "sgate" in w:
            sp = pre + ("shared_expert." if fam == "qwen2_moe" else "shared_experts.")
            h["sgate"] = put(sp + "gate_proj.weight", w["sgate"], "fp8")
            h["sup"] = put(sp + "up_proj.weight", w["sup"], "fp8")
            h["sdown"] = put(sp + "down_proj.weight", w["sdown"], "fp8")
        if "sgw" in w:
            h["sgw"] = put(pre + "shared_expert_gate.weight", w["sgw"])
        held[layer] = h

    # Something that is not the MoE block, as real checkpoints have.
    tensors["model.embed_tokens.weight"] = torch.zeros(4, c["hidden_size"])
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, os.path.join(path, fname))
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)
    return held


# ---- the reference -----------------------------------------------------------------------------

def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _topk(v, k):
    idx = np.argsort(-v, axis=-1, kind="stable")[..., :k]
    return idx, np.take_along_axis(v, idx, axis=-1)


def route(c, h, x):
    """(indices (T, k), weights (T, k)) of the family's router, float64."""
    fam = c["model_type"]
    k = c["num_experts_per_tok"]
    logits = x @ h["router"].T
    if fam == "gpt_oss":
        logits = logits + h["router_bias"]
    if fam in ("granitemoe", "gpt_oss"):
        idx, top = _topk(logits, k)
        return idx, _softmax(top)
    if fam == "deepseek_v3":
        s = 1.0 / (1.0 + np.exp(-logits))
        sc = s + h["e_bias"]
        G, tg = c["n_group"], c["topk_group"]
        T, E = sc.shape
        grp = np.sort(sc.reshape(T, G, E // G), axis=-1)[..., -2:].sum(-1)
        gi, _ = _topk(grp, tg)
        mask = np.zeros((T, G), bool)
        np.put_along_axis(mask, gi, True, axis=-1)
        sc = np.where(np.repeat(mask, E // G, axis=-1), sc, -np.inf)
        idx, _ = _topk(sc, k)
        w = np.take_along_axis(s, idx, axis=-1)
        if c.get("norm_topk_prob", True):
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return idx, w * c.get("routed_scaling_factor", 1.0)
    p = _softmax(logits)
    if fam == "deepseek_v2":
        if c.get("topk_method", "greedy") == "group_limited_greedy":
            G, tg = c["n_group"], c["topk_group"]
            T, E = p.shape
            grp = p.reshape(T, G, E // G).max(-1)
            gi, _ = _topk(grp, tg)
            mask = np.zeros((T, G), bool)
            np.put_along_axis(mask, gi, True, axis=-1)
            p = np.where(np.repeat(mask, E // G, axis=-1), p, 0.0)
        idx, w = _topk(p, k)
        return idx, w * c.get("routed_scaling_factor", 1.0)
    idx, w = _topk(p, k)
    if fam == "mixtral" or c.get("norm_topk_prob", False):
        w = w / w.sum(-1, keepdims=True)
    return idx, w


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _exact(a):
    return a


def expert(c, h, e, x, rows=_exact):
    """rows: how the experts' products see their input rows (exact, or rounded as a low-bit
    kernel rounds them: int8_rows)."""
    x = rows(x)
    if c["model_type"] == "gpt_oss":
        L, a = c.get("swiglu_limit", 7.0), c.get("swiglu_alpha", 1.702)
        g = np.minimum(x @ h["gate"][e].T + h["bg"][e], L)
        u = np.clip(x @ h["up"][e].T + h["bu"][e], -L, L)
        return rows((u + 1.0) * g / (1.0 + np.exp(-a * g))) @ h["down"][e].T + h["bd"][e]
    return rows(_silu(x @ h["gate"][e].T) * (x @ h["up"][e].T)) @ h["down"][e].T


def int8_rows(a, block=32):
    """Rows as the int4 / mxfp4 decode kernels with int8 rows take them (docs/quant.md): each
    `block` values along a row (32; on a tiled matrix min(its block, 128), mxfp4's 128 where
    cpu_info's 'vbmi') scaled by their
    max |x| / 127 (an fp32 scale), rounded to the nearest integer, ties to even."""
    a = np.asarray(a, np.float64)
    out = a.copy()
    for s in range(0, a.shape[-1], block):
        blk = a[..., s:s + block]
        m = (np.abs(blk).max(-1, keepdims=True) / 127).astype(np.float32).astype(np.float64)
        m = np.where(m > 0, m, 1.0)
        out[..., s:s + block] = np.round(blk / m) * m
    return out


def reference(c, h, x, rows=_exact):
    """y (T, d) of the block on x (T, d), and the chosen experts (T, k) as sorted rows."""
    x = np.asarray(x, np.float64)
    idx, w = route(c, h, x)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            y[t] += w[t, j] * expert(c, h, idx[t, j], x[t:t + 1], rows)[0]
    if "sgate" in h:
        xr = rows(x)
        s = rows(_silu(xr @ h["sgate"].T) * (xr @ h["sup"].T)) @ h["sdown"].T
        if "sgw" in h:
            s = s / (1.0 + np.exp(-(x @ h["sgw"].T)))
        y += s
    return y, np.sort(idx, axis=1)


def round_bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).to(
        torch.float64).numpy()


# ---- GPTQ and AWQ checkpoints (an independent NumPy writer and reader, from the formats'
# definitions: AutoGPTQ's and AutoAWQ's packing; not libmoe's code) -------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble p of a word holds column AWQ_ORDER[p]


def _quantize_groups(w, groups, G, sym):
    """w (N, K) float64, groups (K) the group of each input row -> codes (K, N) in 0..15,
    zero points (G, N) in 0..15, fp16 scales (G, N). Symmetric: zero 8, scale max|w| / 7.5;
    else AutoGPTQ's min/max range (both ends widened to include 0)."""
    N, K = w.shape
    q = np.zeros((K, N), np.int64)
    z = np.zeros((G, N), np.int64)
    s = np.zeros((G, N), np.float16)
    for g in range(G):
        rows = np.nonzero(groups == g)[0]
        blk = w[:, rows].T  # (rows, N)
        if sym:
            sc = np.abs(blk).max(axis=0) / 7.5
            zero = np.full(N, 8)
        else:
            lo, hi = np.minimum(blk.min(axis=0), 0), np.maximum(blk.max(axis=0), 0)
            sc = (hi - lo) / 15.0
            sc = np.where(sc > 0, sc, 1.0)
            zero = np.clip(np.round(-lo / sc), 0, 15).astype(np.int64)
        sc = np.where(sc > 0, sc, 1.0).astype(np.float16)
        s[g] = sc
        z[g] = zero
        q[rows] = np.clip(np.round(blk / sc.astype(np.float64)) + zero, 0, 15)
    return q, z, s


def _pack_rows(q):
    """(K, N) codes -> (K/8, N) int32: row k at bits 4·(k % 8) of word (k/8, j)."""
    K, N = q.shape
    out = np.zeros((K // 8, N), np.uint32)
    for i in range(8):
        out |= (q[i::8].astype(np.uint32) & 15) << np.uint32(4 * i)
    return out.view(np.int32)


def _pack_cols(a, order=None):
    """(R, N) nibbles -> (R, N/8) int32: column j at bits 4·(j % 8) of word (r, j/8), or
    with AutoAWQ's order, nibble p holding column order[p] of each 8."""
    R, N = a.shape
    out = np.zeros((R, N // 8), np.uint32)
    for p in range(8):
        col = order[p] if order else p
        out |= (a[:, col::8].astype(np.uint32) & 15) << np.uint32(4 * p)
    return out.view(np.int32)


def _nibbles(words, pos):
    return (words.view(np.uint32) >> np.uint32(4 * pos)) & 15


def gptq_pack(w, group, sym=True, act_order=False, v1=True, rng=None):
    """w (N, K) (nn.Linear's out x in) -> AutoGPTQ's tensors {qweight (K/8, N), qzeros
    (G, N/8), scales (G, N) fp16, g_idx (K)}. act_order: GPTQ visited the rows in a random
    order, so g_idx numbers a row's group by its rank in that order (scattered groups). v1
    stores each zero point minus one (AutoGPTQ's format)."""
    N, K = w.shape
    g = K if group == -1 else group
    G = -(-K // g)
    rank = np.arange(K)
    if act_order:
        rank = np.empty(K, np.int64)
        rank[(rng or np.random.default_rng(0)).permutation(K)] = np.arange(K)
    g_idx = (rank // g).astype(np.int32)
    q, z, s = _quantize_groups(w, g_idx, G, sym)
    return {"qweight": _pack_rows(q), "qzeros": _pack_cols((z - 1) & 15 if v1 else z),
            "scales": s, "g_idx": g_idx}


def gptq_dequant(t, v1=True):
    """The values (N, K) float64 the GPTQ tensors mean, read from the stored words:
    W[k][j] = (q[k][j] - z[g][j]) · scales[g][j] with g = g_idx[k]; v1: z = (stored + 1) & 15."""
    qw, qz, sc, gi = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    K, N = qw.shape[0] * 8, qw.shape[1]
    q = np.empty((K, N), np.int64)
    for i in range(8):
        q[i::8] = _nibbles(qw, i)
    z = np.empty((qz.shape[0], N), np.int64)
    for p in range(8):
        z[:, p::8] = _nibbles(qz, p)
    if v1:
        z = (z + 1) & 15
    return ((q - z[gi]) * sc.astype(np.float64)[gi]).T


def awq_pack(w, group):
    """w (N, K) -> AutoAWQ "gemm" tensors {qweight (K, N/8), qzeros (G, N/8), scales (G, N)}:
    min/max zero points, nibble order AWQ_ORDER."""
    N, K = w.shape
    G = -(-K // group)
    q, z, s = _quantize_groups(w, np.arange(K) // group, G, sym=False)
    return {"qweight": _pack_cols(q, AWQ_ORDER), "qzeros": _pack_cols(z, AWQ_ORDER), "scales": s}


def awq_dequant(t, group):
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    K, N = qw.shape[0], qw.shape[1] * 8

    def unpack(words):
        out = np.empty((words.shape[0], N), np.int64)
        for p in range(8):
            out[:, AWQ_ORDER[p]::8] = _nibbles(words, p)
        return out
    q, z = unpack(qw), unpack(qz)
    g = np.arange(K) // group
    return ((q - z[g]) * sc.astype(np.float64)[g]).T


def not_converted_by(module, patterns):
    """transformers' rule for modules_to_not_convert (quantizers_utils.should_convert_module,
    inverted): a pattern matching the name from its start up to a "." boundary, or a suffix."""
    import re
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(p)
               for p in patterns)


def int4_config(method, group=32, sym=True, act_order=False, v1=True, **extra):
    """config.json's quantization_config as GPTQ (optimum / GPTQModel) or AutoAWQ write it."""
    if method == "gptq":
        q = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym,
             "desc_act": act_order, "checkpoint_format": "gptq" if v1 else "gptq_v2",
             "true_sequential": True, "damp_percent": 0.01}
    else:
        q = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
             "zero_point": True}
    q.update(extra)
    return q


def write_int4_folder(path, c, weights_by_layer, method="gptq", group=32, sym=True,
                      act_order=False, v1=True, not_converted=(), seed=3, qconfig=None):
    """A published GPTQ / AWQ checkpoint: the plain parts F16 (the router, the shared expert's
    gate), every expert linear (routed and shared) as <module>.qweight / .qzeros / .scales
    (/ .g_idx for GPTQ) unless its name contains one of `not_converted` (kept as F16
    <module>.weight, listed in modules_to_not_convert). Returns, per layer, the float64 values
    the files mean (the dequantization of the stored words), for the reference."""
    from safetensors.numpy import load_file, save_file as save_np
    cfg = dict(c)
    q = qconfig if qconfig is not None else int4_config(method, group, sym, act_order, v1)
    if not_converted:
        q = dict(q, modules_to_not_convert=list(not_converted))
    cfg["quantization_config"] = q
    held = write_folder(path, cfg, weights_by_layer, dtype="F16", stacked=False)
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    rng = np.random.default_rng(seed)
    fam = c["model_type"]
    for layer, h in held.items():
        h["_group"] = group  # the decode's int8 row block follows it (tests: kernel_rows)
        pre = block_prefix(fam, layer, False)
        names = ("w1", "w3", "w2") if fam == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        d, E, F = dims(c)
        mods = [(f"{pre}experts.{e}.{n}", key, e) for e in range(E)
                for key, n in zip(("gate", "up", "down"), names)]
        if "sgate" in h:
            sp = pre + ("shared_expert." if fam == "qwen2_moe" else "shared_experts.")
            mods += [(sp + n, key, None) for key, n in
                     zip(("sgate", "sup", "sdown"), ("gate_proj", "up_proj", "down_proj"))]
        for mod, key, e in mods:
            if not_converted_by(mod, not_converted):
                continue
            w = t.pop(mod + ".weight").astype(np.float64)
            if method == "gptq":
                packed = gptq_pack(w, group, sym, act_order, v1, rng)
                vals = gptq_dequant(packed, v1)
                if not act_order:
                    packed.pop("g_idx") if rng.random() < 0.5 else None  # optional when sorted
            else:
                packed = awq_pack(w, group)
                vals = awq_dequant(packed, group)
            for k, v in packed.items():
                t[f"{mod}.{k}"] = np.ascontiguousarray(v)
            if e is None:
                h[key] = vals
            else:
                h[key] = h[key].copy()
                h[key][e] = vals
    save_np(t, f)
    return held
