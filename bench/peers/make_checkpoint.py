"""Writes a full-size random checkpoint folder of one real model's MoE block, the way the model
is published (config.json, per-expert tensor names, bf16, sharded with an index), for
`moe bench --config real-models`. Only decoder layer 0's MoE block is written: the loader reads
one layer's tensors and nothing else.

    python make_checkpoint.py --model Qwen3-30B-A3B --out DIR [--shard-mb 1024] [--seed 0] [--quick]

Prints one JSON line: {"dir": ..., "bytes": block bytes, "files": [...]}.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

# The published configs' MoE fields (hidden sizes, experts, routing) of the two models.
MODELS = {
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
        hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=40960,
        tie_word_embeddings=False),
    "Mixtral-8x7B": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=4096,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, hidden_act="silu",
        rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False),
}


def block_tensors(name, cfg, gen):
    """(tensor name, shape, std) of layer 0's MoE block, published names, (out, in) weights."""
    d = cfg["hidden_size"]
    if cfg["model_type"] == "mixtral":
        E, F, pre = cfg["num_local_experts"], cfg["intermediate_size"], "model.layers.0.block_sparse_moe"
        yield f"{pre}.gate.weight", (E, d), d ** -0.5
        for e in range(E):
            yield f"{pre}.experts.{e}.w1.weight", (F, d), d ** -0.5
            yield f"{pre}.experts.{e}.w3.weight", (F, d), d ** -0.5
            yield f"{pre}.experts.{e}.w2.weight", (d, F), F ** -0.5
    else:
        E, F, pre = cfg["num_experts"], cfg["moe_intermediate_size"], "model.layers.0.mlp"
        yield f"{pre}.gate.weight", (E, d), d ** -0.5
        for e in range(E):
            yield f"{pre}.experts.{e}.gate_proj.weight", (F, d), d ** -0.5
            yield f"{pre}.experts.{e}.up_proj.weight", (F, d), d ** -0.5
            yield f"{pre}.experts.{e}.down_proj.weight", (d, F), F ** -0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-mb", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="d and d_ff / 16: a smoke test")
    a = ap.parse_args()
    cfg = dict(MODELS[a.model], num_hidden_layers=1, torch_dtype="bfloat16")
    if a.quick:
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
            if key in cfg:
                cfg[key] //= 16
        a.shard_mb = min(a.shard_mb, 2)  # several shards all the same
    os.makedirs(a.out, exist_ok=True)
    gen = torch.Generator().manual_seed(a.seed)
    shards, cur, cur_bytes, total = [], {}, 0, 0
    for name, shape, std in block_tensors(a.model, cfg, gen):
        t = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if cur and cur_bytes + nbytes > a.shard_mb << 20:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += nbytes
        total += nbytes
    shards.append(cur)
    weight_map, files = {}, []
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(a.out, fn), metadata={"format": "pt"})
        files.append(fn)
        for n in sh:
            weight_map[n] = fn
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(json.dumps({"dir": a.out, "bytes": total, "files": files}))


if __name__ == "__main__":
    main()
