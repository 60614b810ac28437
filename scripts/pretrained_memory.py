#!/usr/bin/env python3
"""Peak memory of loading one pretrained MoE block (SPEC §7: at most 1.3x the block's own
weights in the chosen precision; a low-bit block kept as stored, precision "auto": at most
1.2x its stored bytes). Writes a sharded random checkpoint of a Mixtral- or Qwen3-MoE-shaped
model (several layers, the block of interest in the middle; bf16 files, or the experts as
FP8 e4m3 with 128 x 128 block scales, or GPTQ int4 g128) to a temporary folder, then in a
fresh process per precision loads one block and reports

    peak growth = VmHWM after the load - VmRSS before it (the interpreter and libraries
                  already resident), against the block's bytes in that precision (bf16,
                  fp32) or its stored bytes (auto on fp8 / gptq);
    the load's time beside the time to read that layer's shard (warm page cache).

Not a test: sizes are chosen on the command line, e.g.
    PYTHONPATH=build/python .venv/bin/python scripts/pretrained_memory.py --shape mixtral-small
    PYTHONPATH=build/python .venv/bin/python scripts/pretrained_memory.py --shape qwen3-small --format gptq
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = {  # d, E, F, layers, family
    "mixtral-small": (1024, 8, 3584, 4, "mixtral"),
    "qwen3-small": (1024, 64, 384, 4, "qwen3_moe"),
    "mixtral-8x7b": (4096, 8, 14336, 2, "mixtral"),
}

CHILD = r"""
import json, os, sys, time, moe
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, layer, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = moe.inspect_pretrained(path)
before = status("VmRSS:")
t0 = time.perf_counter()
m = moe.MoE.from_pretrained(path, layer, precision=precision)
load_s = time.perf_counter() - t0
peak = status("VmHWM:")
# Reading the layer's shard itself (warm page cache, 64 MiB at a time): the floor of a load.
shard = os.path.join(path, f"model-{layer + 1:05d}-of-{info['layers']:05d}.safetensors")
t0 = time.perf_counter()
with open(shard, "rb", buffering=0) as f:
    while f.read(64 << 20):
        pass
read_s = time.perf_counter() - t0
block = {"bf16": info["bf16_bytes_per_block"], "fp32": info["fp32_bytes_per_block"]}.get(
    precision, info["file_bytes_per_block"])
print(json.dumps({"precision": m.config["precision"], "before": before, "peak": peak,
                  "growth": peak - before, "block": block,
                  "file_bytes": info["file_bytes_per_block"], "load_s": load_s,
                  "read_s": read_s}))
"""


def fp8_block_quantize(w):
    """w (R, C) float32 torch -> (e4m3 tensor, scale_inv (ceil(R/128), ceil(C/128)) fp32)."""
    import torch
    R, C = w.shape
    nr, nc = -(-R // 128), -(-C // 128)
    pad = torch.zeros(nr * 128, nc * 128)
    pad[:R, :C] = w
    blocks = pad.reshape(nr, 128, nc, 128)
    s = blocks.abs().amax(dim=(1, 3)) / 448.0 + 1e-12
    q = (blocks / s[:, None, :, None]).reshape(nr * 128, nc * 128)[:R, :C]
    return q.to(torch.float8_e4m3fn).contiguous(), s.to(torch.float32)


def expert_tensors(t, module, w, fmt):
    """module.weight (out, in) in the format asked for."""
    import torch
    if fmt == "bf16":
        t[module + ".weight"] = w.to(torch.bfloat16)
    elif fmt == "fp8":
        t[module + ".weight"], t[module + ".weight_scale_inv"] = fp8_block_quantize(w)
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
        import pretrained_folders as pf
        # as AutoGPTQ writes it: g_idx too (sorted, without act-order)
        for k, v in pf.gptq_pack(w.double().numpy(), 128, sym=True).items():
            t[f"{module}.{k}"] = torch.from_numpy(v.copy())


def write_checkpoint(path, d, E, F, layers, family, fmt="bf16"):
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    weight_map = {}
    for l in range(layers):
        t = {}
        pre = f"model.layers.{l}." + ("block_sparse_moe." if family == "mixtral" else "mlp.")
        names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj",
                                                                  "down_proj")
        t[pre + "gate.weight"] = torch.randn(E, d, dtype=torch.bfloat16)
        for e in range(E):
            for n, shape in zip(names, ((F, d), (F, d), (d, F))):
                expert_tensors(t, f"{pre}experts.{e}.{n}", torch.randn(*shape) / 16, fmt)
        fname = f"model-{l + 1:05d}-of-{layers:05d}.safetensors"
        save_file(t, os.path.join(path, fname))
        weight_map.update({n: fname for n in t})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = {"model_type": family, "hidden_size": d, "num_hidden_layers": layers,
           "num_experts_per_tok": 2, "hidden_act": "silu"}
    if family == "mixtral":
        cfg.update(num_local_experts=E, intermediate_size=F)
    else:
        cfg.update(num_experts=E, moe_intermediate_size=F, norm_topk_prob=True)
    if fmt == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                      "fmt": "e4m3", "activation_scheme": "dynamic"}
    elif fmt == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                      "sym": True, "desc_act": False,
                                      "checkpoint_format": "gptq"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-small")
    ap.add_argument("--format", choices=["bf16", "fp8", "gptq"], default="bf16",
                    help="how the files store the experts (fp8, gptq: loaded with precision "
                         "auto, kept as stored, and bf16)")
    ap.add_argument("--dir", help="reuse or keep the checkpoint here (default: a temp folder)")
    args = ap.parse_args()
    d, E, F, layers, family = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or tmp
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, "config.json")):
            write_checkpoint(path, d, E, F, layers, family, args.format)
        for precision in (("bf16", "fp32") if args.format == "bf16" else ("auto", "bf16")):
            out = subprocess.run([sys.executable, "-c", CHILD, path, str(layers // 2), precision],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                sys.exit(out.stderr)
            r = json.loads(out.stdout)
            print(f"{args.shape} {args.format} {precision} ({r['precision']}): block {r['block'] / 2**20:.1f} MiB "
                  f"(files {r['file_bytes'] / 2**20:.1f} MiB), peak growth "
                  f"{r['growth'] / 2**20:.1f} MiB = {r['growth'] / r['block']:.3f} x the block; load "
                  f"{r['load_s']:.2f} s, reading the shard {r['read_s']:.2f} s")


if __name__ == "__main__":
    main()
