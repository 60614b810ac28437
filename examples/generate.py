#!/usr/bin/env python3
"""Greedy generation with a transformers MoE model, its MoE blocks as transformers has them
and replaced by libmoe's (issue 21, item 5: "a model that generates faster").

    PYTHONPATH=build/python .venv/bin/python examples/generate.py --model qwen3
    PYTHONPATH=build/python .venv/bin/python examples/generate.py --model gpt-oss --json

The model is a published one's config.json (Qwen/Qwen3-30B-A3B or openai/gpt-oss-20b, written
below: the hub is not reached) with only --layers decoder layers, bf16, with random weights
drawn from --seed by the model's own initialiser (normal, std = initializer_range = 0.02, as
transformers' _init_weights; norms at one), so that its logits are not degenerate. One
prompt of --prompt random token ids (from the seed) is generated greedily for --new-tokens
tokens (min_new_tokens = max_new_tokens: end-of-sequence does not stop it) by

  1. transformers alone: the model's own bf16 MoE blocks;
  2. for each P of --precisions (default bf16,int8,int4,published): the blocks replaced by
     moe.hf.replace_moe_blocks(model, precision=P). A precision replace_moe_blocks refuses
     (ValueError, RuntimeError) prints a "skipped" row. Names are passed through unchanged
     ("auto": the row names what the library chose), but for "published": the format the
     model's experts are published in (PUBLISHED: fp8 for Qwen3, as Qwen/Qwen3-30B-A3B-FP8;
     mxfp4 for GPT-OSS, as openai/gpt-oss-20b), converted from the random bf16 weights by
     replace_moe_blocks — the published checkpoint itself is not read. Its row is labelled
     "libmoe published (<format>)". transformers 5.24 has no CPU kernels for these formats
     here (its FP8 quantizer dequantizes to bf16 without a GPU, its MXFP4 one without the
     `kernels` package), so on this CPU the published model under transformers is the
     transformers row.

Every variant runs on the same model object: replace_moe_blocks swaps the block modules and
the originals are put back afterwards, so the weights are the same tensors, not a second
draw. A generate of 2 tokens from the same prompt warms each variant up before its timed
one. --repeat N runs N rounds, each over every variant in turn (replacing the blocks again),
and reports each variant's fastest run (least prefill + decode time; --json lists every
run's times): on a shared machine a slow spell then falls on all variants alike.

Memory: every replacement holds its experts in its own precision alone (bf16 too:
replace_moe_blocks(..., masters=False), since nothing here trains) beside the original blocks,
which wait to be put back.

Columns (one row a variant, or one JSON object a variant with --json):
  prefill s      time to the first token: from the call of generate to the first call of
                 its logits processors (a LogitsProcessor that records time.perf_counter),
                 i.e. the prompt's forward and its last position's logits.
  decode tok/s   the other new tokens over the time between the first and the last
                 processor call (each step: one token's forward, the logits, the argmax).
  moe % pre/dec  the MoE blocks' share of the prefill and of the decode time: forward
                 pre-hooks and hooks on each block module (the modules replace_moe_blocks
                 replaces; for transformers the same modules, found by hf.py's rule).
  moe ms/tok     the MoE blocks' time (all layers) per decoded token, from the same hooks:
                 what the blocks cost at decode, apart from the rest of the step.
  MB/token       bytes one decoded token reads from the weights: every parameter but the
                 experts not chosen — attention, norms, one embedding row, lm_head, router,
                 and the top_k experts a token runs, per layer, in the variant's precision
                 (EXPERT_BITS: the formats' scales included). libmoe holds the router and
                 the expert biases in fp32. Neither the KV cache nor activations count.
  bound tok/s    the decode rate that MB/token allows at --read-gbs (default: measured here,
                 a torch sum over a 1 GiB buffer on --threads threads, best of 3, before
                 the model is built).
  % bound        decode tok/s as a share of bound tok/s.
  tokens         the generated ids against transformers': "same", or the first position
                 (0 = the first new token) where they differ and whether transformers' own
                 greedy choice there (the same context before it) was a near-tie: its logit
                 for its token at most one bf16 step (2^-7 of the logit's power of two: the
                 resolution of the bf16 logits) above its logit for the variant's token.
                 transformers' bf16 blocks round the router logits, the routing weights and
                 each expert's intermediate results to bf16; replace_moe_blocks makes
                 libmoe's blocks of a bf16 model round at the same places and break router
                 ties as torch.topk does (docs/routing.md, "Rounding as transformers"), but
                 its products sum in another order than torch's, so a few intermediate values
                 a token still differ by a bf16 step, and a greedy choice between two
                 near-tied logits can go either way. --json also gives both sides' gaps, and, for a difference,
                 how many of transformers' top-k router choices up to that token had their
                 k-th and (k+1)-th logits within one bf16 step (router_near_ties of
                 router_choices: one more untimed generate of transformers with hooks on its
                 routers, run only when some variant differs).

After the table: the bf16 tokens' verdict (equal, or where they leave transformers' and
whether that is a near-tie) and issue 21's goals: the MoE blocks' time per new token with
int4 blocks against transformers' bf16 blocks (>= 3x), the time to first token with bf16
blocks against transformers' (>= 1.5x, on a machine with AMX: elsewhere the figure is given
and not judged), and bf16 tokens equal. --tiny sizes list the goals without judging them.
--json ends with one object {"goals": [...]}.

--check-tokens exits 1 if the bf16 variant's tokens differ from transformers'.

--fp64-sums adds the row "transformers, fp64 sums": transformers' own blocks with each of their
grouped expert products (the gate_up and down products of transformers' "grouped_mm" experts,
transformers.integrations.moe._grouped_mm) summed in float64 and rounded once to bf16, in place
of torch's bf16 GEMMs and their fp32 summation order; everything else is transformers'. Its
tokens are compared with transformers' as any row's: where they differ, the greedy tokens of
the model at these sizes depend on the products' summation order, which libmoe's products do
not share with torch's GEMMs (docs/models.md). Its timings are those of float64 products and are not printed (--json
keeps them). A model whose experts do not run "grouped_mm" gives a "skipped" row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import moe  # noqa: E402
import moe.hf  # noqa: E402

# https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json, less its
# "quantization_config" (MXFP4 experts; here the experts are random bf16 tensors).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

MODELS = {"qwen3": ("Qwen/Qwen3-30B-A3B", QWEN3_30B_A3B),
          "gpt-oss": ("openai/gpt-oss-20b", GPT_OSS_20B)}

# --precisions "published": the libmoe precision of the format each model's experts are
# published in, and what is published so. The row converts this script's random bf16
# experts to that format (replace_moe_blocks); it reads no published file. Qwen3-30B-A3B is
# also published as Qwen/Qwen3-30B-A3B-GPTQ-Int4, which libmoe loads as precision int4: the
# int4 row (libmoe's own round-to-nearest quantizer here, not GPTQ's).
PUBLISHED = {
    "qwen3": ("fp8", "Qwen/Qwen3-30B-A3B-FP8: E4M3 experts with 128 x 128 block scales"),
    "gpt-oss": ("mxfp4", "openai/gpt-oss-20b: MXFP4 experts, E2M1 with an E8M0 scale per 32"),
}

# --tiny: the same family and structure (GQA, q/k norms or sinks and biases, sliding and
# full layers, top-k of E), at sizes a test runs in seconds. Token ids move inside the vocab.
TINY = {
    "qwen3": {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
              "num_experts": 16, "num_experts_per_tok": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
              "bos_token_id": 509, "eos_token_id": 510},
    "gpt-oss": {"hidden_size": 64, "intermediate_size": 64, "num_local_experts": 8,
                "num_experts_per_tok": 2, "experts_per_token": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
                "sliding_window": 8, "eos_token_id": 510, "pad_token_id": 511},
}

# Bits one expert weight takes in each precision, and bytes a column of an expert matrix adds:
# int8 holds an fp32 scale and an int32 column sum a column (docs/design.md, "Precision
# int8"); the low-bit formats as docs/quant.md gives them (int4: 4 + 32/group, 4.25 at its
# default group of 128; mxfp4's E8M0 a 32 values; fp8's fp32 a 128 × 128 block).
EXPERT_BITS = {"fp32": (32.0, 0), "bf16": (16.0, 0), "int8": (8.0, 8), "int4": (4.25, 0),
               "mxfp4": (4.25, 0), "fp8": (8.002, 0)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen3")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated (default 64)")
    p.add_argument("--precisions", default="bf16,int8,int4,published",
                   help="libmoe precisions, comma-separated; 'published': the model's "
                        "published expert format (default bf16,int8,int4,published)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--read-gbs", type=float, default=None,
                   help="read bandwidth in GB/s for the bound (default: measured)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over the variants; each variant's fastest run is reported")
    p.add_argument("--tiny", action="store_true",
                   help="the family's structure at tiny sizes (tests)")
    p.add_argument("--json", action="store_true", help="one JSON object a variant")
    p.add_argument("--check-tokens", action="store_true",
                   help="exit 1 if the bf16 tokens differ from transformers'")
    p.add_argument("--fp64-sums", action="store_true",
                   help="add a row: transformers' own blocks, their expert products summed in "
                        "float64 and rounded once to bf16")
    args = p.parse_args(argv)
    for name in ("layers", "prompt", "new_tokens", "threads", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.read_gbs is not None and not args.read_gbs > 0:
        p.error(f"--read-gbs: must be > 0, got {args.read_gbs}")
    return args


# ---- the model ----------------------------------------------------------------------------


def build_model(args):
    """The published config with --layers layers (and --tiny's sizes), bf16, weights drawn
    from --seed by transformers' own initialiser."""
    _, published = MODELS[args.model]
    values = dict(published)
    values["num_hidden_layers"] = args.layers
    if "layer_types" in values:  # the published pattern, cycled over the layers kept
        pattern = values["layer_types"]
        values["layer_types"] = [pattern[i % len(pattern)] for i in range(args.layers)]
    if args.tiny:
        values.update(TINY[args.model])
    model_type = values.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **values)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def is_block(mod):
    """python/moe/hf.py's _is_block: what replace_moe_blocks replaces."""
    experts = getattr(mod, "experts", None)
    return (isinstance(experts, torch.nn.Module) and hasattr(experts, "gate_up_proj")
            and (hasattr(mod, "gate") or hasattr(mod, "router")))


def put_back(model, blocks):
    """Undo replace_moe_blocks: the original block modules at their names again."""
    for name, block in blocks.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, block)


# ---- what a decoded token reads -----------------------------------------------------------


def nbytes(t):
    return t.numel() * t.element_size()


def expert_bytes(config):
    """Bytes of one expert's matrices as a libmoe layer (its `config`) holds them, or None
    for a precision EXPERT_BITS does not know. The shapes come from the config: a layer in
    an evaluation-only precision holds no fp32 masters to look at."""
    precision = config["precision"]
    if precision not in EXPERT_BITS:
        return None
    bits, per_column = EXPERT_BITS[precision]
    if precision == "int4":
        bits = 4 + 32 / config["int4_group"]
    d, F, d_out = config["d_model"], config["d_ff"], config.get("d_out") or config["d_model"]
    shapes = {"linear_relu": [(d, d_out)], "mlp": [(d, F), (F, d_out)]}.get(
        config["expert"], [(d, F), (d, F), (F, d_out)])  # swiglu, clamped_swiglu: W1, W3, W2
    return sum(n_in * n_out * bits / 8 + n_out * per_column for n_in, n_out in shapes)


def block_bytes(block, k, libmoe):
    """Bytes one token at decode reads from one MoE block: its router and k of its E
    experts. A transformers block holds everything in the model's dtype; a libmoe block its
    router and expert biases in fp32 and its expert matrices in its precision (the fp32
    masters replace_moe_blocks keeps in bf16 with masters=True are not read)."""
    if not libmoe:
        router = getattr(block, "gate", None) or getattr(block, "router")
        E = block.experts.gate_up_proj.shape[0]
        return (sum(nbytes(p) for p in router.parameters())
                + k / E * sum(nbytes(p) for p in block.experts.parameters()))
    c = block.config
    matrices = expert_bytes(c)
    if matrices is None:
        return None
    total = k * matrices
    for name, p in block.named_parameters(recurse=False):
        if name in ("W_g", "b_g"):
            total += nbytes(p)
        elif name in ("b1", "b2", "b3"):  # (E, n): the chosen experts' rows
            total += k / c["n_experts"] * nbytes(p)
    return total


def decode_bytes(model, block_names, libmoe):
    """Bytes one decoded token reads from the weights (see the module docstring)."""
    blocks = [model.get_submodule(n) for n in block_names]
    inside = {id(p) for b in blocks for p in b.parameters()}
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    rest = sum(nbytes(p) for p in model.parameters() if id(p) not in inside and p is not emb)
    rest += nbytes(emb) if tied else emb.shape[1] * emb.element_size()
    k = model.config.num_experts_per_tok
    per_block = [block_bytes(b, k, libmoe) for b in blocks]
    if any(b is None for b in per_block):
        return None
    return rest + sum(per_block)


def read_bandwidth_gbs():
    """GB/s of a torch sum over a 1 GiB float32 buffer (written first), best of 3."""
    buf = torch.ones(1 << 28, dtype=torch.float32)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        buf.sum().item()
        best = min(best, time.perf_counter() - t)
    return nbytes(buf) / best / 1e9


# ---- timing -------------------------------------------------------------------------------


class Stamps(transformers.LogitsProcessor):
    """Records the time of each call (once a generated token, right after its forward) and
    the logits it sees, for the margins at a token difference."""

    def __init__(self):
        self.times = []
        self.logits = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        self.logits.append(scores[0].clone())
        return scores


class BlockClock:
    """(start, end) of every forward of the given modules (they never nest)."""

    def __init__(self, modules):
        self.spans = []
        self._start = None
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self.spans.append((self._start, time.perf_counter()))

    def inside(self, lo, hi):
        return sum(e - s for s, e in self.spans if s >= lo and e <= hi)

    def remove(self):
        for h in self._handles:
            h.remove()


# The --fp64-sums row's "precision": transformers' blocks, their products summed in float64.
FP64_SUMS = "fp64 sums"


def libmoe_blocks(precision):
    """Whether the variant runs libmoe's blocks (not transformers' own, as they are or with
    float64 sums)."""
    return precision not in (None, FP64_SUMS)


def round_once(x, dtype):
    """float64 x rounded once (to nearest, ties to even) to dtype (bf16 or fp16). torch's own
    float64 -> bf16 cast goes through float32 and rounds twice (1 + 2^-8 + 2^-30 becomes 1.0,
    not 1 + 2^-7). Here the float32 step rounds to odd (toward zero, the last bit set where
    inexact), which keeps the rounding of the second step exact: float32 holds more than two
    bits beyond either 16-bit format."""
    f = x.float()
    inexact = f.double() != x
    toward_zero = torch.where(inexact & (f.double().abs() > x.abs()),
                              torch.nextafter(f, torch.zeros_like(f)), f)
    odd = toward_zero.view(torch.int32) | inexact.to(torch.int32)
    return odd.view(torch.float32).to(dtype)


def fp64_grouped_mm(input, weight, offs):
    """transformers.integrations.moe._grouped_mm's product summed in float64: rows offs[e-1]
    to offs[e] of input (S, K) times weight[e] (K, N), each result rounded once to the
    input's dtype (round_once)."""
    out = torch.empty(input.shape[0], weight.shape[-1], dtype=input.dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = round_once(input[start:end].double() @ weight[e].double(),
                                        input.dtype)
        start = end
    return out


class Fp64Sums:
    """While open, transformers' grouped expert products are fp64_grouped_mm. Refuses
    (ValueError) a model whose experts do not run "grouped_mm"."""

    def __init__(self, model):
        impl = getattr(model.config, "_experts_implementation", None)
        if impl != "grouped_mm":
            raise ValueError(f"transformers runs this model's experts as {impl!r}, not "
                             f"'grouped_mm', whose products --fp64-sums replaces")
        import transformers.integrations.moe as hf_moe
        self.module = hf_moe

    def __enter__(self):
        self.saved = self.module._grouped_mm
        self.module._grouped_mm = fp64_grouped_mm
        return self

    def __exit__(self, *exc):
        self.module._grouped_mm = self.saved


def generate(model, ids, new_tokens, processors=None):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=model.config.pad_token_id or 0,
                          logits_processor=processors)


def timed_generate(model, ids, new_tokens, block_names):
    """(new token ids, prefill s, decode s, MoE s in the prefill, MoE s in the decode,
    the logits of each step)."""
    stamps = Stamps()
    clock = BlockClock([model.get_submodule(n) for n in block_names])
    try:
        t0 = time.perf_counter()
        out = generate(model, ids, new_tokens, transformers.LogitsProcessorList([stamps]))
    finally:
        clock.remove()
    t1, tn = stamps.times[0], stamps.times[-1]
    return (out[0, ids.shape[1]:].tolist(), t1 - t0, tn - t1, clock.inside(t0, t1),
            clock.inside(t1, tn), stamps.logits)


def run_variant(model, ids, args, block_names, precision):
    """One warmed-up, timed generate of the model as it stands: (its row: timings and
    tokens, its logits of each step); precision None: transformers alone."""
    generate(model, ids, 2)  # warm-up: buffers for the prompt's length, one decode step
    tokens, prefill, decode, moe_pre, moe_dec, logits = timed_generate(
        model, ids, args.new_tokens, block_names)
    steps = args.new_tokens - 1
    held = None
    if libmoe_blocks(precision):  # what the library chose ("auto" resolved)
        held = model.get_submodule(block_names[0]).config["precision"]
    row = {"prefill_s": prefill,
           "decode_tok_s": steps / decode if steps else None,
           "moe_share_prefill": moe_pre / prefill,
           "moe_share_decode": moe_dec / decode if steps else None,
           "moe_ms_per_token": 1e3 * moe_dec / steps if steps else None,
           "bytes_per_token": decode_bytes(model, block_names, libmoe_blocks(precision)),
           "held_precision": held,
           "tokens": tokens}
    return row, logits


def fastest(runs):
    """Of one variant's runs (row, logits), the one of least prefill + decode time, its row
    holding every run's prefill time and decode rate. The runs must agree on the tokens."""
    if any(row["tokens"] != runs[0][0]["tokens"] for row, _ in runs):
        raise RuntimeError("two runs of the same variant generated different tokens")
    rows = [row for row, _ in runs]
    row, logits = min(runs, key=lambda r: r[0]["prefill_s"] + (
        len(r[0]["tokens"]) - 1) / (r[0]["decode_tok_s"] or math.inf))
    row = dict(row, runs=len(rows), prefill_s_runs=[r["prefill_s"] for r in rows],
               decode_tok_s_runs=[r["decode_tok_s"] for r in rows])
    return row, logits

# ---- the report ---------------------------------------------------------------------------


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def bf16_step(x):
    """The spacing of bf16 values at |x| (8 significant bits): 2^(e - 8) for |x| = m * 2^e,
    1/2 <= m < 1; 0 for 0."""
    if x == 0 or not math.isfinite(x):
        return 0.0
    return math.ldexp(1.0, math.frexp(x)[1] - 8)


def compare_tokens(tokens, logits, ref_tokens, ref_logits):
    """The first position where `tokens` leave transformers' and, there (same context
    before it), how far each side's logits put its own token above the other's, and
    whether transformers' own choice was a near-tie: its gap at most one bf16 step at the
    larger of the two logits (the resolution of its bf16 logits)."""
    i = first_difference(tokens, ref_tokens)
    out = {"tokens_equal": i is None, "first_difference": i}
    if i is not None and i < min(len(tokens), len(ref_tokens)):
        mine, theirs = tokens[i], ref_tokens[i]
        gap = (ref_logits[i][theirs] - ref_logits[i][mine]).item()
        step = bf16_step(max(abs(ref_logits[i][theirs].item()), abs(ref_logits[i][mine].item())))
        out["reference_gap"] = gap
        out["variant_gap"] = (logits[i][mine] - logits[i][theirs]).item()
        out["reference_gap_steps"] = gap / step if step else (0.0 if gap == 0 else math.inf)
        out["near_tie"] = gap <= step
    return out


def router_of(block):
    return getattr(block, "gate", None) or getattr(block, "router")


def router_near_ties(model, ids, args, block_names):
    """One untimed greedy generate of the model as it stands (transformers' own blocks) with
    hooks on its routers: (its tokens, near-ties by step, choices by step). Step j is the
    forward whose logits choose new token j (0: the prompt's). A choice is one token's top-k
    in one block; a near-tie, one whose k-th and (k+1)-th router logits (bf16, as the
    router computes them) lie within one bf16 step at the k-th: libmoe, routing on fp32
    logits, can order such a pair the other way."""
    k = model.config.num_experts_per_tok
    stamps = Stamps()
    ties = [0] * (args.new_tokens + 1)
    choices = [0] * (args.new_tokens + 1)

    def hook(module, inputs, out):
        logits = out[0].detach().float().reshape(-1, out[0].shape[-1])
        if k >= logits.shape[-1]:
            return
        top = logits.topk(k + 1, dim=-1).values
        kth = top[:, k - 1]
        step = torch.ldexp(torch.ones_like(kth), torch.frexp(kth)[1] - 8)
        j = len(stamps.times)
        ties[j] += int(((kth - top[:, k]) <= step).sum())
        choices[j] += logits.shape[0]

    handles = [router_of(model.get_submodule(n)).register_forward_hook(hook)
               for n in block_names]
    try:
        out = generate(model, ids, args.new_tokens, transformers.LogitsProcessorList([stamps]))
    finally:
        for h in handles:
            h.remove()
    return out[0, ids.shape[1]:].tolist(), ties, choices


def tokens_verdict(row, new_tokens):
    """One line: whether the variant's tokens equal transformers', and where not, whether
    transformers' choice there was a near-tie."""
    name = row["variant"]
    if row["tokens_equal"]:
        return (f"{name}: tokens equal transformers' (the unreplaced model's), all "
                f"{new_tokens} new tokens.")
    i = row["first_difference"]
    line = f"{name}: tokens NOT equal: they leave transformers' at new token {i} of {new_tokens}."
    if "reference_gap" not in row:
        return line
    line += (f" There transformers' logit for its token is {row['reference_gap']:.3g} "
             f"({row['reference_gap_steps']:.2g} bf16 steps) above its logit for the variant's: ")
    if row["near_tie"]:
        line += "a near-tie, below the resolution of its bf16 logits."
    elif row.get("precision") == FP64_SUMS:
        line += ("NOT a near-tie: transformers' own blocks, their products summed in float64, "
                 "leave its greedy tokens: at these sizes the tokens depend on the products' "
                 "summation order.")
    elif row.get("precision") in (None, "fp32", "bf16"):
        line += "NOT a near-tie: bf16 rounding does not explain this difference."
    else:  # quantized experts: their weights are not the bf16 ones
        line += (f"NOT a near-tie ({row['precision']} experts are a quantization of the bf16 "
                 f"weights, not a rounding of the same sums).")
    if "router_near_ties" in row:
        line += (f" Up to that token {row['router_near_ties']} of transformers' "
                 f"{row['router_choices']} top-k router choices had the k-th and (k+1)-th "
                 f"logits within one bf16 step")
        line += (" (libmoe rounds the router logits to bf16 and breaks their ties as "
                 "torch.topk does, so it chooses as transformers wherever its inputs are the "
                 "same)." if libmoe_blocks(row.get("precision")) else ".")
    return line


def goals(rows, tiny):
    """Issue 21 part 5's goals from the rows (by variant): [{goal, value, target, met,
    detail}]; met None when not judged (not measured, --tiny sizes, no AMX)."""
    by = {r["variant"]: r for r in rows if "skipped" not in r}
    ref, bf16, int4 = by.get("transformers"), by.get("libmoe bf16"), by.get("libmoe int4")
    amx = moe.cpu_info().get("best") == "amx"
    out = []

    def goal(text, num, den, what, target, judged=True, why=""):
        if num is None or den is None or not den:
            out.append({"goal": text, "value": None, "target": target, "met": None,
                        "detail": f"not measured: {what}"})
            return
        value = num / den
        met = (value >= target) if judged and not tiny else None
        detail = why or ("--tiny sizes" if tiny else "")
        out.append({"goal": text, "value": value, "target": target, "met": met,
                    "detail": detail})

    goal("MoE blocks' time per new token, transformers bf16 / libmoe int4",
         ref and ref["moe_ms_per_token"], int4 and int4["moe_ms_per_token"],
         "needs the transformers and libmoe int4 rows with --new-tokens >= 2", 3.0)
    goal("time to first token, transformers bf16 / libmoe bf16 [AMX machine]",
         ref and ref["prefill_s"], bf16 and bf16["prefill_s"],
         "needs the transformers and libmoe bf16 rows", 1.5, judged=amx,
         why="" if amx else (f"this CPU has no AMX (moe.cpu_info() best: "
                             f"{moe.cpu_info().get('best')}); the goal is for an AMX machine"))
    text = "bf16 tokens equal transformers' (the unreplaced model's)"
    if bf16 is None or "tokens_equal" not in bf16:
        out.append({"goal": text, "value": None, "target": True, "met": None,
                    "detail": "not measured: needs the transformers and libmoe bf16 rows"})
    else:
        equal = bf16["tokens_equal"]
        if equal:
            detail = f"all {len(bf16['tokens'])} new tokens"
        else:
            detail = f"they leave transformers' at new token {bf16['first_difference']}"
            if "near_tie" in bf16:
                detail += (", where transformers' own choice was a near-tie" if bf16["near_tie"]
                           else ", where transformers' own choice was NOT a near-tie")
        fp64 = next((r for r in by.values() if r.get("precision") == FP64_SUMS), None)
        if fp64 is not None and "tokens_equal" in fp64:
            detail += ("; transformers' own blocks with fp64 sums keep all its tokens"
                       if fp64["tokens_equal"] else
                       f"; transformers' own blocks with fp64 sums leave them at new token "
                       f"{fp64['first_difference']}")
        if tiny:
            detail += "; --tiny sizes"
        out.append({"goal": text, "value": equal, "target": True,
                    "met": None if tiny else equal, "detail": detail,
                    "verdict": tokens_verdict(bf16, len(bf16["tokens"]))})
    return out


def print_goals(gs):
    print("Goals (issue 21, part 5):")
    for g in gs:
        state = {True: "met", False: "MISSED", None: "not judged"}[g["met"]]
        if g["value"] is None:
            print(f"  {g['goal']}: {g['detail']}")
            continue
        if isinstance(g["value"], bool):
            figure = "yes" if g["value"] else "no"
        else:
            figure = f"{g['value']:.2f}x (target >= {g['target']:g}x)"
        print(f"  {g['goal']}: {figure}: {state}" + (f" ({g['detail']})" if g["detail"] else ""))


COLUMNS = (("variant", 24, "<"), ("prefill s", 9, ">"), ("decode tok/s", 12, ">"),
           ("moe % pre/dec", 13, ">"), ("moe ms/tok", 10, ">"), ("MB/token", 9, ">"),
           ("bound tok/s", 11, ">"), ("% bound", 7, ">"), ("tokens", 0, "<"))


def table_line(cells):
    return "  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS)).rstrip()


def row_cells(row):
    if "skipped" in row:
        return [row["variant"], f"skipped: {row['skipped']}"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.0f}"

    if row["precision"] is None:
        tokens = "reference"
    elif row["tokens_equal"]:
        tokens = "same"
    else:
        tokens = f"differ at {row['first_difference']}"
        if "reference_gap" in row:
            tokens += (f" ({'near-tie' if row['near_tie'] else 'NOT a near-tie'}: "
                       f"{row['reference_gap_steps']:.2g} bf16 steps)")
    mb, bound, rate = row["bytes_per_token"], row["bound_tok_s"], row["decode_tok_s"]
    if row["precision"] == FP64_SUMS:  # float64 products: their times say nothing here
        return [row["variant"]] + ["—"] * (len(COLUMNS) - 2) + [tokens]
    return [row["variant"], f"{row['prefill_s']:.3f}",
            "—" if rate is None else f"{rate:.2f}",
            f"{pct(row['moe_share_prefill'])} / {pct(row['moe_share_decode'])}",
            "—" if row["moe_ms_per_token"] is None else f"{row['moe_ms_per_token']:.2f}",
            "?" if mb is None else f"{mb / 1e6:.1f}",
            "?" if bound is None else f"{bound:.2f}",
            "?" if bound is None or rate is None else pct(rate / bound), tokens]


def print_row(row, as_json):
    if as_json:
        print(json.dumps(row), flush=True)
    elif "skipped" in row:
        print(f"{row['variant']:<24}  {row_cells(row)[1]}", flush=True)
    else:
        print(table_line(row_cells(row)), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    torch.set_num_threads(args.threads)
    moe.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    read_gbs = args.read_gbs if args.read_gbs is not None else read_bandwidth_gbs()
    model = build_model(args)
    c = model.config
    block_names = [n for n, m in model.named_modules() if is_block(m)]
    ids = torch.randint(0, c.vocab_size, (1, args.prompt),
                        generator=torch.Generator().manual_seed(args.seed))

    # (row label, precision given to replace_moe_blocks); None: transformers alone
    published, published_as = PUBLISHED[args.model]
    variants = [("transformers", None)] + [
        (f"libmoe published ({published})", published) if p == "published"
        else (f"libmoe {p}", p) for p in precisions]
    if args.fp64_sums:
        variants.append(("transformers, fp64 sums", FP64_SUMS))
    runs = [[] for _ in variants]
    skipped = {}
    # --repeat rounds, each over every variant in turn: a slow spell of the machine is shared
    for _ in range(args.repeat):
        for i, (_, precision) in enumerate(variants):
            if i in skipped:
                continue
            originals = {n: model.get_submodule(n) for n in block_names}
            sums = contextlib.nullcontext()
            try:
                if precision == FP64_SUMS:
                    sums = Fp64Sums(model)
                elif precision is not None:
                    moe.hf.replace_moe_blocks(model, precision=precision, masters=False)
            except (ValueError, RuntimeError) as e:  # the library refuses this precision
                skipped[i] = str(e)
                continue
            try:
                with sums:
                    runs[i].append(run_variant(model, ids, args, block_names, precision))
            finally:
                put_back(model, originals)

    source, _ = MODELS[args.model]
    head = {"model": source + (" (tiny)" if args.tiny else ""), "layers": args.layers,
            "moe_blocks": len(block_names), "seed": args.seed, "prompt": args.prompt,
            "new_tokens": args.new_tokens, "threads": args.threads,
            "read_gbs": read_gbs, "read_gbs_measured": args.read_gbs is None,
            "experts_implementation": getattr(c, "_experts_implementation", None),
            "attn_implementation": getattr(c, "_attn_implementation", None)}

    rows = []
    reference = None  # (tokens, logits) of transformers alone
    for i, (label, precision) in enumerate(variants):
        row = dict(head, variant=label, precision=precision)
        if label.startswith("libmoe published"):
            row["published_as"] = published_as
        if i in skipped:
            row["skipped"] = skipped[i]
            rows.append(row)
            continue
        result, logits = fastest(runs[i])
        row.update(result)
        if libmoe_blocks(precision) and row["held_precision"] != precision:
            row["variant"] += f" ({row['held_precision']})"  # what "auto" chose
        mb = row["bytes_per_token"]
        row["bound_tok_s"] = None if mb is None else read_gbs * 1e9 / mb
        if reference is None and precision is None:
            reference = (row["tokens"], logits)
        if reference is not None:
            row.update(compare_tokens(row["tokens"], logits, *reference))
        rows.append(row)

    # Where a variant's tokens differ: transformers' router near-ties up to that token.
    differ = [r for r in rows if "reference_gap" in r]
    if differ:
        tokens, ties, choices = router_near_ties(model, ids, args, block_names)
        for r in differ:
            if tokens != reference[0]:
                r["router_note"] = "the hooked rerun of transformers generated other tokens"
                continue
            upto = r["first_difference"] + 1
            r["router_near_ties"], r["router_choices"] = sum(ties[:upto]), sum(choices[:upto])

    if not args.json:
        E = getattr(c, "num_local_experts", None) or c.num_experts
        F = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        how = "--read-gbs" if args.read_gbs is not None else "measured: 1 GiB sum, best of 3"
        print(f"{head['model']}: {args.layers} of {MODELS[args.model][1]['num_hidden_layers']} "
              f"layers, d {c.hidden_size}, {E} experts of width {F}, "
              f"top-{c.num_experts_per_tok}, vocab {c.vocab_size}; bf16, random weights "
              f"(seed {args.seed})")
        print(f"prompt {args.prompt} tokens, {args.new_tokens} new (greedy), "
              f"{args.threads} threads, {args.repeat} round(s); transformers experts "
              f"'{head['experts_implementation']}', attention '{head['attn_implementation']}'; "
              f"read bandwidth {read_gbs:.1f} GB/s ({how})")
        if "published" in precisions:
            print(f"published: {published_as}; the row converts the random bf16 experts to "
                  f"{published} (replace_moe_blocks(precision=\"{published}\")), reading no "
                  f"published file. transformers 5.24 loads that format on a CPU dequantized "
                  f"to bf16 (without the `kernels` package): for it, the transformers row.")
        print(table_line([name for name, _, _ in COLUMNS]))
    for row in rows:
        print_row(row, args.json)
    gs = goals(rows, args.tiny)
    if args.json:
        print(json.dumps({"goals": gs}), flush=True)
    else:
        print()
        for row in rows:  # every variant's tokens, then the goals
            if "tokens_equal" in row and row["precision"] is not None:
                print(tokens_verdict(row, len(row["tokens"])))
        print()
        print_goals(gs)

    bf16 = [r for r in rows if r["variant"] == "libmoe bf16" and "tokens_equal" in r]
    if args.check_tokens and bf16 and not bf16[0]["tokens_equal"]:
        print("bf16 tokens differ from transformers' (--check-tokens)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
