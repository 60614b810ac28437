"""The `transformers` peer of `moe bench --model` / `--config real-models`: the model family's
own MoE block module (the class transformers builds for that layer), in bf16 or fp32, timed on
random hidden states. Its router weight is read from the checkpoint (so it routes as the
loaded block does); the expert weights are random of the same shapes (time does not depend on
their values, only on the rows each expert receives). Every experts implementation that
transformers registers and that runs on CPU ("eager", "batched_mm", "grouped_mm") is timed;
the fastest is the peer.

    python hf_block.py --model DIR --layer N --tokens T [--threads 2] [--repeat 3] [--dtype bf16]
                       [--layers 1]

--layers N (cold decode): N independent copies of the block (the same weights, held N times),
called in turn and the time divided by N, so that the weights come from memory and not from
the cache, as libmoe's decode rows are measured.

Prints one JSON line: {"fwd_s": best seconds, "impl": name, "impls": {name: seconds},
"torch": version, "transformers": version}.
"""
import argparse
import copy
import importlib
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

BLOCKS = {  # model_type -> (modeling module, MoE block class, router attribute, prefix)
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "gate", ("block_sparse_moe", "mlp")),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate", ("mlp",)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", ("mlp",)),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock", "gate", ("mlp",)),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2Moe", "gate", ("mlp",)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "gate", ("mlp",)),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "router", ("mlp",)),
    "granitemoe": ("granitemoe", "GraniteMoeMoE", "router", ("block_sparse_moe",)),
}


def router_weight(path, layer, prefixes, attr):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
    else:
        wm = None
    for pre in prefixes:
        for name in (f"model.layers.{layer}.{pre}.{attr}.weight",
                     f"model.layers.{layer}.{pre}.{attr}.layer.weight"):
            fn = wm.get(name) if wm is not None else "model.safetensors"
            if not fn:
                continue
            with safe_open(os.path.join(path, fn), "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--impls", default="eager,batched_mm,grouped_mm")
    ap.add_argument("--layers", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    config = transformers.AutoConfig.from_pretrained(a.model)
    mod_name, cls_name, attr, prefixes = BLOCKS[config.model_type]
    mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
    torch.set_default_dtype(dtype)
    try:
        block = getattr(mod, cls_name)(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() >= 2:  # (.., out, in) or (.., in, out): scale by the larger fan
                p.copy_((torch.randn(p.shape, generator=g) / max(p.shape[-1], p.shape[-2]) ** 0.5).to(p.dtype))
            else:
                p.zero_()
        w = router_weight(a.model, a.layer, prefixes, attr)
        router = getattr(block, attr)
        target = router.weight if hasattr(router, "weight") else router.layer.weight
        if w is not None and tuple(w.shape) == tuple(target.shape):
            target.copy_(w.to(target.dtype))
    # Cold decode: copies of the block, each with weights of its own.
    blocks = [block] + [copy.deepcopy(block) for _ in range(max(a.layers, 1) - 1)]
    x = torch.randn(1, a.tokens, config.hidden_size, generator=g).to(dtype)
    times = {}
    k = getattr(config, "num_experts_per_tok", 1)
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    for impl in a.impls.split(","):
        # batched_mm gathers a copy of the weights of every (token, expert) pair: at prefill
        # sizes that is hundreds of GB, so it is only tried where the copies fit in 4 GiB.
        if impl == "batched_mm" and a.tokens * k * 3 * config.hidden_size * inter * 2 > 4 << 30:
            times[impl] = "skipped: would gather T*k copies of the expert weights"
            continue
        config._experts_implementation = impl
        for b in blocks:
            for m in b.modules():
                if hasattr(m, "config"):
                    m.config._experts_implementation = impl
        try:
            with torch.no_grad():
                for b in blocks:
                    b(x)  # warm-up
                best = float("inf")
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    for b in blocks:
                        b(x)
                    best = min(best, (time.perf_counter() - t0) / len(blocks))
            times[impl] = best
        except Exception as e:  # an implementation that does not run on CPU is skipped
            times[impl] = f"failed: {type(e).__name__}"
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    impl = min(ok, key=ok.get)
    print(json.dumps({"fwd_s": ok[impl], "impl": impl, "impls": times, "layers": len(blocks),
                      "torch": torch.__version__, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
