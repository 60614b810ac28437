#!/usr/bin/env python3
"""Peak memory of loading one pretrained MoE block (SPEC §7: at most 1.3x the block's own
weights in the chosen precision). Writes a sharded random checkpoint of a Mixtral- or
Qwen3-MoE-shaped model (several layers, bf16 files, the block of interest in the middle) to a
temporary folder, then in a fresh process per precision loads one block and reports

    peak growth = VmHWM after the load - VmRSS before it (the interpreter and libraries
                  already resident), against the block's bytes in that precision;
    the load's time beside the time to read that layer's shard (warm page cache).

Not a test: sizes are chosen on the command line, e.g.
    PYTHONPATH=build/python .venv/bin/python scripts/pretrained_memory.py --shape mixtral-small
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
block = info["bf16_bytes_per_block"] if precision == "bf16" else info["fp32_bytes_per_block"]
print(json.dumps({"precision": precision, "before": before, "peak": peak,
                  "growth": peak - before, "block": block,
                  "file_bytes": info["file_bytes_per_block"], "load_s": load_s,
                  "read_s": read_s}))
"""


def write_checkpoint(path, d, E, F, layers, family):
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
            t[f"{pre}experts.{e}.{names[0]}.weight"] = torch.randn(F, d, dtype=torch.bfloat16)
            t[f"{pre}experts.{e}.{names[1]}.weight"] = torch.randn(F, d, dtype=torch.bfloat16)
            t[f"{pre}experts.{e}.{names[2]}.weight"] = torch.randn(d, F, dtype=torch.bfloat16)
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
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-small")
    ap.add_argument("--dir", help="reuse or keep the checkpoint here (default: a temp folder)")
    args = ap.parse_args()
    d, E, F, layers, family = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or tmp
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, "config.json")):
            write_checkpoint(path, d, E, F, layers, family)
        for precision in ("bf16", "fp32"):
            out = subprocess.run([sys.executable, "-c", CHILD, path, str(layers // 2), precision],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                sys.exit(out.stderr)
            r = json.loads(out.stdout)
            print(f"{args.shape} {precision}: block {r['block'] / 2**20:.1f} MiB "
                  f"(files {r['file_bytes'] / 2**20:.1f} MiB), peak growth "
                  f"{r['growth'] / 2**20:.1f} MiB = {r['growth'] / r['block']:.3f} x the block; load "
                  f"{r['load_s']:.2f} s, reading the shard {r['read_s']:.2f} s")


if __name__ == "__main__":
    main()
