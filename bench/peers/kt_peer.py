"""The KTransformers peer of `moe bench`: a MoE block's routed experts (swiglu, no bias) run by
kt-kernel's CPU MoE operators through its own Python API (`kt_kernel_ext.moe`: MOEConfig,
load_weights_task, forward_task on a CPUInfer pool), with the routing libmoe's row used (the
expert ids and gate weights it chose for the same tokens) and random bf16 weights of the block's
shapes. One class per precision (KINDS below):

    bf16          AMXBF16_MOE          the bf16 weights
    int8          AMXInt8_MOE          per-channel int8, quantized by kt-kernel from the bf16
                                       weights
    int4          AMXInt4_1KGroup_MOE  int4 in groups of "int4_group" (default 128) along K with a
                                       zero point per group (AWQ-style), quantized by kt-kernel
    int4_channel  AMXInt4_MOE          int4 with one scale per output channel, by kt-kernel
    int4_gptq     AVX2GPTQInt4_MOE     GPTQ's symmetric int4 (qweight (K/8, N) int32, fp32 scales
                                       (K/group, N), value (q - 8)·scale), quantized here
    mxfp4         AMXFP4_KGroup_MOE    OCP MXFP4: E2M1 codes two a byte (value 2i low nibble),
                                       a power-of-two scale per 32 along K (as bf16), quantized here
    fp8           AMXFP8_MOE           E4M3 with one fp32 scale per 128 x 128 block
                                       (DeepSeek's weight_scale_inv), quantized here

"Quantized here": kt-kernel reads those formats only as checkpoints store them, so this script
makes them from the bf16 weights with the formats' own definitions (round to nearest; MXFP4's
shared exponent floor(log2(amax)) - 2 and codes clamped to ±6; FP8 scale amax/448; GPTQ's
round-to-nearest scale 2·amax/15 in fp16, without GPTQ's error feedback).

It runs under the interpreter of .venv-kt/ (scripts/bench_setup.sh), never the project's
.venv/: kt-kernel pins torch 2.9.1. kt-kernel picks its kernel variant from the CPU (amx,
avx512_bf16, ... ; `variant` in the output says which ran): on a CPU without AMX the classes keep
their AMX names but run AVX-512 code (the AVX2* classes run AVX2 code everywhere).

    python kt_peer.py --probe
    python kt_peer.py --case '{"T": 512, "d": 2048, "f": 768, "E": 128, "k": 8,
                               "precision": "int4", "int4_group": 128}' [--routing FILE]
                      [--threads 2] [--repeat 5] [--layers 1]

--routing FILE: the tokens and routing as libmoe used them, little-endian, one after the other:
x float32 (T, d), expert ids int32 (T, k), gate weights float32 (T, k). Without it the tokens
and routing are random (seeded). --layers N: N independent copies of the block (the same
weights, packed N times), called in turn and the time divided by N, so that a decode step reads
its weights from memory and not from the cache (cold decode, as libmoe's row is measured).
Times: best of --repeat sweeps after one warm-up sweep (and their median).

Prints one JSON line: {"fwd_s": best, "fwd_median_s", "samples", "class", "format", "group",
"variant", "int8_kernel", "kt_kernel", "torch", "threads", "layers", "check_rel_err"
[, "check_rel_err_quantized"]} or, when it cannot run here, {"skipped": "<reason>"} with exit
status 0. check_rel_err: the largest error of the first tokens' outputs against a float32
evaluation of the same unquantized bf16 weights and routing, relative to the largest reference
value (the quantized formats differ by their quantization). check_rel_err_quantized (the
formats quantized here): the same against the weights as quantized, dequantized in float32 -
what kt-kernel computes apart from its bf16 activations, so a misread layout shows there.
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    cls: str      # kt_kernel_ext.moe class
    feed: str     # "bf16": kt-kernel is given the bf16 weights (and quantizes them itself);
    #               "gptq", "mxfp4", "fp8": tensors in that format, made by quantize_* below
    format: str   # what the output's "format" says
    bits: int = 0      # quant_config (0: left at its defaults)
    group: int = 0     # values per scale along K (0: none, or "int4_group" of the case when -1)
    zero_point: bool = False


KINDS = {
    "bf16": Kind("AMXBF16_MOE", "bf16", "bf16"),
    "int8": Kind("AMXInt8_MOE", "bf16", "int8 per channel, quantized by kt-kernel"),
    "int4": Kind("AMXInt4_1KGroup_MOE", "bf16", "int4 group {g} with zero points, quantized by "
                 "kt-kernel", bits=4, group=-1, zero_point=True),
    "int4_channel": Kind("AMXInt4_MOE", "bf16", "int4 per channel, quantized by kt-kernel"),
    "int4_gptq": Kind("AVX2GPTQInt4_MOE", "gptq", "GPTQ int4 group {g} symmetric", bits=4,
                      group=-1),
    "mxfp4": Kind("AMXFP4_KGroup_MOE", "mxfp4", "MXFP4 (E2M1, E8M0 scale per 32)", bits=4,
                  group=32),
    "fp8": Kind("AMXFP8_MOE", "fp8", "FP8 E4M3, fp32 scale per 128x128 block", bits=8, group=128),
}
CLASSES = {p: k.cls for p, k in KINDS.items()}
_OUT = None  # the real standard output: kt-kernel's C++ code prints its own lines to fd 1


def emit(obj):
    out = _OUT or sys.stdout
    out.write(json.dumps(obj) + "\n")
    out.flush()


def load_kt():
    """(torch, kt_kernel, kt_kernel_ext) or raises with the reason."""
    import torch  # noqa: F401  (kt-kernel imports it too; its version is reported)
    import kt_kernel
    from kt_kernel import kt_kernel_ext
    return torch, kt_kernel, kt_kernel_ext


def describe(torch, kt_kernel, ext):
    return {"kt_kernel": getattr(kt_kernel, "__version__", "?"),
            "variant": getattr(kt_kernel, "__cpu_variant__", "?"),
            "int8_kernel": getattr(kt_kernel, "__int8_kernel__", "?"),
            "torch": torch.__version__,
            "classes": [c for c in CLASSES.values() if hasattr(ext.moe, c)]}


def probe():
    try:
        torch, kt_kernel, ext = load_kt()
    except Exception as e:  # noqa: BLE001 - any import failure is the reason to report
        emit({"ok": False, "reason": f"kt-kernel not importable: {type(e).__name__}: {e}"[:300]})
        return
    emit(dict(describe(torch, kt_kernel, ext), ok=True))


def read_routing(path, T, d, k, torch):
    with open(path, "rb") as f:
        raw = f.read()
    want = 4 * (T * d + 2 * T * k)
    if len(raw) != want:
        raise ValueError(f"--routing: {len(raw)} bytes, expected {want} for T={T} d={d} k={k}")
    buf = bytearray(raw)
    x = torch.frombuffer(buf, dtype=torch.float32, count=T * d).reshape(T, d)
    ids = torch.frombuffer(buf, dtype=torch.int32, count=T * k, offset=4 * T * d).reshape(T, k)
    w = torch.frombuffer(buf, dtype=torch.float32, count=T * k, offset=4 * (T * d + T * k))
    return x.clone(), ids.clone(), w.reshape(T, k).clone()


def reference(x, ids, w, weights, torch):
    """float32 evaluation of the swiglu experts: (rows, d). weights(e) gives expert e's gate,
    up (f, d) and down (d, f) as float32."""
    out = torch.zeros(x.shape[0], x.shape[1])
    cache = {}
    for t in range(x.shape[0]):
        xt = x[t].float()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in cache:
                cache[e] = weights(e)
            gate, up, down = cache[e]
            h = torch.nn.functional.silu(gate @ xt) * (up @ xt)
            out[t] += float(w[t, j]) * (down @ h)
    return out


# Quantizers, one expert's matrix W (N, K) float32 at a time (the checkpoints' (out, in)), each
# returning (the tensors kt-kernel reads, W as quantized in float32).

def pack_nibbles(q, torch):
    """(N, K) codes 0..15 -> (N, K/2) bytes, value 2i in the low nibble of byte i."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def quantize_gptq(W, group, torch):
    """GPTQ symmetric int4 (sym=true, desc_act=false): scale = 2·amax/15 per (group, column) in
    fp16 as GPTQ stores it, q = clamp(round(W/scale) + 8, 0, 15); qweight (K/8, N) int32 holds
    row k at bits 4·(k%8) of word (k/8, n); scales (K/group, N) float32."""
    N, K = W.shape
    Wg = W.reshape(N, K // group, group)
    scale = (Wg.abs().amax(-1) * (2.0 / 15.0)).half().float().clamp_min(1e-10)  # (N, G)
    q = (torch.round(Wg / scale[..., None]) + 8).clamp(0, 15)
    deq = ((q - 8) * scale[..., None]).reshape(N, K)
    words = pack_nibbles(q.reshape(N, K), torch).view(torch.int32)  # (N, K/8), little-endian
    return (words.t().contiguous(), scale.t().contiguous()), deq


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def quantize_mxfp4(W, torch):
    """OCP MX (v1.0) FP4: per 32 values along K a shared scale 2^s with s = floor(log2(amax)) -
    2 (E2M1's largest exponent), codes the nearest E2M1 value of W/2^s clamped to ±6 (ties, which
    random weights do not meet, to the smaller magnitude). Codes (N, K/2) bytes, scales (N, K/32)
    bf16 (a power of two is exact there)."""
    N, K = W.shape
    Wg = W.reshape(N, K // 32, 32)
    amax = Wg.abs().amax(-1)
    s = torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2
    scale = torch.pow(2.0, s.clamp(-126, 127))
    v = Wg / scale[..., None]
    grid = torch.tensor(E2M1)
    mids = (grid[1:] + grid[:-1]) / 2
    mag = torch.bucketize(v.abs().clamp(max=6.0), mids)  # index 0..7
    codes = mag + 8 * (v < 0).to(mag.dtype)
    deq = (grid[mag] * torch.sign(v) * scale[..., None]).reshape(N, K)
    return (pack_nibbles(codes.reshape(N, K), torch), scale.to(torch.bfloat16).contiguous()), deq


def quantize_fp8(W, torch):
    """FP8 as DeepSeek-V3 stores it: per 128 x 128 block scale_inv = amax/448 (fp32), codes
    E4M3 of W/scale_inv rounded to nearest; W ≈ code · scale_inv. Codes (N, K) bytes, scales
    (N/128, K/128) float32."""
    N, K = W.shape
    Wb = W.reshape(N // 128, 128, K // 128, 128)
    sinv = (Wb.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)  # (N/128, K/128)
    q = (Wb / sinv[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * sinv[:, None, :, None]).reshape(N, K)
    return (q.reshape(N, K).view(torch.uint8).contiguous(), sinv.contiguous()), deq


def quantize_all(kind, group, mats, torch):
    """mats: (E, N, K) bf16 -> (codes (E, ...), scales (E, ...), dequant(e) -> (N, K) float32)."""
    def one(W):
        if kind.feed == "gptq":
            return quantize_gptq(W, group, torch)
        if kind.feed == "mxfp4":
            return quantize_mxfp4(W, torch)
        return quantize_fp8(W, torch)
    codes, scales = [], []
    for e in range(mats.shape[0]):
        (c, sc), _ = one(mats[e].float())
        codes.append(c)
        scales.append(sc)
    return torch.stack(codes).contiguous(), torch.stack(scales).contiguous(), \
        lambda e: one(mats[e].float())[1]


def check_shapes(kind, group, d, f):
    """Why kt-kernel's class cannot take these shapes ("" when it can)."""
    if group > 0 and (d % group or f % group):
        return (f"kt-kernel's {kind.cls} needs d and f multiples of its group {group} "
                f"(d {d}, f {f})")
    if kind.feed == "gptq" and (d % 8 or f % 8):
        return f"kt-kernel's {kind.cls} needs d and f multiples of 8 (d {d}, f {f})"
    return ""


def run(a):
    c = json.loads(a.case)
    T, d, f, E, k, prec = c["T"], c["d"], c["f"], c["E"], c["k"], c.get("precision", "bf16")
    if prec not in KINDS:
        return {"skipped": f"kt-kernel has no {prec} MoE ({', '.join(KINDS)})"}
    kind = KINDS[prec]
    group = int(c.get("int4_group", 128)) if kind.group < 0 else kind.group
    if why := check_shapes(kind, group, d, f):
        return {"skipped": why}
    try:
        torch, kt_kernel, ext = load_kt()
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"kt-kernel not importable: {type(e).__name__}: {e}"[:300]}
    info = describe(torch, kt_kernel, ext)
    cls = getattr(ext.moe, kind.cls, None)
    if cls is None:
        return {"skipped": f"kt-kernel {info['kt_kernel']} ({info['variant']} variant) has no "
                           f"{kind.cls}"}
    if prec == "int8" and str(info["int8_kernel"]) == "unsupported":
        return {"skipped": f"kt-kernel {info['kt_kernel']} ({info['variant']} variant): no int8 "
                           "kernel for this CPU"}
    torch.set_num_threads(max(a.threads, 1))
    g = torch.Generator().manual_seed(c.get("seed", 0))
    if a.routing:
        x32, ids32, w = read_routing(a.routing, T, d, k, torch)
    else:
        x32 = torch.randn(T, d, generator=g)
        ids32 = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
        w = torch.softmax(torch.randn(T, k, generator=g), dim=1)
    # Weights as the checkpoints store them, (out, in): gate and up (E, f, d), down (E, d, f).
    gate = (torch.randn(E, f, d, generator=g) / d ** 0.5).to(torch.bfloat16).contiguous()
    up = (torch.randn(E, f, d, generator=g) / d ** 0.5).to(torch.bfloat16).contiguous()
    down = (torch.randn(E, d, f, generator=g) / f ** 0.5).to(torch.bfloat16).contiguous()
    feed = {"gate": (gate, None), "up": (up, None), "down": (down, None)}
    dequant = None
    if kind.feed != "bf16":
        q = {n: quantize_all(kind, group, m, torch) for n, m in
             (("gate", gate), ("up", up), ("down", down))}
        feed = {n: (v[0], v[1]) for n, v in q.items()}
        dequant = lambda e: tuple(q[n][2](e) for n in ("gate", "up", "down"))  # noqa: E731
    x = x32.to(torch.bfloat16).contiguous()
    ids = ids32.to(torch.int64).contiguous()
    w = w.to(torch.float32).contiguous()
    out = torch.zeros(T, d, dtype=torch.bfloat16)
    qlen = torch.tensor([T], dtype=torch.int32)
    identity = torch.arange(E, dtype=torch.int64)

    cfg_pool = ext.WorkerPoolConfig()
    cfg_pool.subpool_count = 1
    cfg_pool.subpool_numa_map = [0]
    cfg_pool.subpool_thread_count = [max(a.threads, 1)]
    cpu = ext.CPUInfer(cfg_pool)
    moes = []
    for i in range(max(a.layers, 1)):
        cfg = ext.moe.MOEConfig(E, k, d, f)
        cfg.layer_idx = i
        cfg.max_len = -(-max(T, 1) // 64) * 64  # buffers in whole M_STEP tiles
        cfg.pool = cpu.backend_
        cfg.gate_proj = feed["gate"][0].data_ptr()
        cfg.up_proj = feed["up"][0].data_ptr()
        cfg.down_proj = feed["down"][0].data_ptr()
        if kind.feed != "bf16":
            cfg.gate_scale = feed["gate"][1].data_ptr()
            cfg.up_scale = feed["up"][1].data_ptr()
            cfg.down_scale = feed["down"][1].data_ptr()
        if kind.bits:
            cfg.quant_config.bits = kind.bits
            cfg.quant_config.group_size = group
            cfg.quant_config.zero_point = kind.zero_point
        m = cls(cfg)
        cpu.submit(m.load_weights_task(identity.data_ptr()))
        cpu.sync()
        moes.append(m)

    def call(m):
        cpu.submit(m.forward_task(qlen.data_ptr(), k, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                  out.data_ptr(), False))
        cpu.sync()

    call(moes[0])
    n_check = min(T, 4)
    got = out[:n_check].float()

    def rel_err(weights):
        ref = reference(x[:n_check], ids[:n_check], w[:n_check], weights, torch)
        return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)

    checks = {"check_rel_err": rel_err(
        lambda e: (gate[e].float(), up[e].float(), down[e].float()))}
    if dequant is not None:
        checks["check_rel_err_quantized"] = rel_err(dequant)

    def sweep():
        t0 = time.perf_counter()
        for m in moes:  # one layer after the other, each finished before the next starts
            call(m)
        return (time.perf_counter() - t0) / len(moes)

    sweep()  # warm-up
    samples = [sweep() for _ in range(max(a.repeat, 1))]
    return dict(info, fwd_s=min(samples), fwd_median_s=statistics.median(samples),
                samples=samples, threads=max(a.threads, 1), layers=len(moes),
                format=kind.format.format(g=group), group=group, **checks,
                **{"class": kind.cls})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true", help="report what kt-kernel offers here")
    ap.add_argument("--case", help="JSON object: T, d, f, E, k, precision (" + "|".join(KINDS)
                    + "), int4_group, seed")
    ap.add_argument("--routing", help="tokens and routing file (see above)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=1)
    a = ap.parse_args()
    # Standard output carries the one JSON line only; what kt-kernel prints goes to stderr.
    global _OUT
    sys.stdout.flush()
    _OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if a.probe:
        probe()
        return
    if not a.case:
        ap.error("--case or --probe")
    try:
        emit(run(a))
    except Exception as e:  # noqa: BLE001 - a kernel that refuses is a skipped row, with why
        emit({"skipped": f"kt-kernel failed: {type(e).__name__}: {e}"[:300]})


if __name__ == "__main__":
    main()
