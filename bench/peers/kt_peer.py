"""The KTransformers peer of `moe bench`: a MoE block's routed experts (swiglu, no bias) run by
kt-kernel's CPU MoE operators, AMXBF16_MOE in bf16 and AMXInt8_MOE in int8 (quantized by
kt-kernel itself from the same bf16 weights), through its own Python API
(`kt_kernel_ext.moe`: MOEConfig, load_weights_task, forward_task on a CPUInfer pool), with the
routing libmoe's row used (the expert ids and gate weights it chose for the same tokens) and
random bf16 weights of the block's shapes.

It runs under the interpreter of .venv-kt/ (scripts/bench_setup.sh), never the project's
.venv/: kt-kernel pins torch 2.9.1. kt-kernel picks its kernel variant from the CPU (amx,
avx512_bf16, ... ; `variant` in the output says which ran): on a CPU without AMX the classes keep
their AMX names but run AVX-512 code.

    python kt_peer.py --probe
    python kt_peer.py --case '{"T": 512, "d": 2048, "f": 768, "E": 128, "k": 8,
                               "precision": "bf16"}' [--routing FILE] [--threads 2]
                      [--repeat 5] [--layers 1]

--routing FILE: the tokens and routing as libmoe used them, little-endian, one after the other:
x float32 (T, d), expert ids int32 (T, k), gate weights float32 (T, k). Without it the tokens
and routing are random (seeded). --layers N: N independent copies of the block (the same
weights, packed N times), called in turn and the time divided by N, so that a decode step reads
its weights from memory and not from the cache (cold decode, as libmoe's row is measured).
Times: best of --repeat sweeps after one warm-up sweep (and their median).

Prints one JSON line: {"fwd_s": best, "fwd_median_s", "samples", "class", "variant",
"int8_kernel", "kt_kernel", "torch", "threads", "layers", "check_rel_err"} or, when it cannot
run here, {"skipped": "<reason>"} with exit status 0. check_rel_err: the largest error of the
first tokens' outputs against a float32 evaluation of the same bf16 weights and routing,
relative to the largest reference value (int8 differs by its quantization).
"""
import argparse
import json
import os
import statistics
import sys
import time

CLASSES = {"bf16": "AMXBF16_MOE", "int8": "AMXInt8_MOE"}
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


def reference(x, ids, w, gate, up, down, torch):
    """float32 evaluation of the swiglu experts on the same bf16 weights: (rows, d)."""
    out = torch.zeros(x.shape[0], down.shape[1])
    for t in range(x.shape[0]):
        xt = x[t].float()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(gate[e].float() @ xt) * (up[e].float() @ xt)
            out[t] += float(w[t, j]) * (down[e].float() @ h)
    return out


def run(a):
    c = json.loads(a.case)
    T, d, f, E, k, prec = c["T"], c["d"], c["f"], c["E"], c["k"], c.get("precision", "bf16")
    if prec not in CLASSES:
        return {"skipped": f"kt-kernel has no {prec} MoE (bf16 and int8 only)"}
    try:
        torch, kt_kernel, ext = load_kt()
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"kt-kernel not importable: {type(e).__name__}: {e}"[:300]}
    info = describe(torch, kt_kernel, ext)
    cls = getattr(ext.moe, CLASSES[prec], None)
    if cls is None:
        return {"skipped": f"kt-kernel {info['kt_kernel']} ({info['variant']} variant) has no "
                           f"{CLASSES[prec]}"}
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
        cfg.gate_proj = gate.data_ptr()
        cfg.up_proj = up.data_ptr()
        cfg.down_proj = down.data_ptr()
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
    ref = reference(x[:n_check], ids[:n_check], w[:n_check], gate, up, down, torch)
    err = (out[:n_check].float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)

    def sweep():
        t0 = time.perf_counter()
        for m in moes:  # one layer after the other, each finished before the next starts
            call(m)
        return (time.perf_counter() - t0) / len(moes)

    sweep()  # warm-up
    samples = [sweep() for _ in range(max(a.repeat, 1))]
    return dict(info, fwd_s=min(samples), fwd_median_s=statistics.median(samples),
                samples=samples, threads=max(a.threads, 1), layers=len(moes),
                check_rel_err=err, **{"class": CLASSES[prec]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true", help="report what kt-kernel offers here")
    ap.add_argument("--case", help="JSON object: T, d, f, E, k, precision (bf16|int8)")
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
