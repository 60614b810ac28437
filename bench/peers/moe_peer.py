#!/usr/bin/python3
"""The PyTorch peer of libmoe's MoE layer, for `moe bench`.

The same layer written as a careful PyTorch user would: the router's gate and noise
products in one matmul, noise, topk + softmax, capacity drop (rank-major "position"
policy) without any (T, E, C) tensor, tokens sorted by expert, one gather, one matmul
(addmm) per expert over its contiguous rows, one weighted index_add for the combine, and
the balancing loss. Forward is timed in training mode with autograd recording (it saves
what backward needs, as libmoe's forward does), or under inference_mode for evaluation;
forward+backward runs autograd on (y, aux_loss) with a given dy.

The peer is the fastest form a PyTorch user would write, each form measured ("forms" lists
them all, "form" / "form_fwdbwd" name the fastest forward and forward+backward):
- the expert products as `x @ W + b`, `torch.addmm(b, x, W)` or `F.linear(x, W, b)` (weights
  stored (out, in) as nn.Linear holds them); without biases `x @ W` or `F.linear`. (On an AMX
  Xeon torch's bf16 addmm ran 3x slower than `x @ W + b` on the same layer.)
- in bf16 ("dtype": "bf16"): native bf16 tensors (parameters and input torch.bfloat16, every
  operation in it) or fp32 parameters under `torch.autocast("cpu", dtype=torch.bfloat16)`; and,
  dropless, the sorted dispatch above or a loop over experts that gathers each expert's tokens
  with a mask (transformers' eager MoE blocks).

"layers": N (evaluation rows, cold decode): N independent copies of the layer, called in
turn and the time divided by N, so that the weights come from memory, not the cache, as
libmoe's decode rows are measured.

Usage: moe_peer.py --case '{"T": 4096, "d": 1024, ...}' [--threads N] [--repeat R]
Prints one JSON object: fwd_s, fwdbwd_s (null when not asked), form, form_fwdbwd, forms,
kept_rows, threads, blas. `moe bench` runs it with OPENBLAS_CORETYPE set in its environment.
"""
import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def linear_forms(c):
    """The ways of writing the expert products, for this case's experts."""
    if c.get("bias", True) and c["expert"] != "swiglu":
        return ["x @ W + b", "addmm", "F.linear"]
    return ["x @ W", "F.linear"]


class PeerMoE(torch.nn.Module):
    def __init__(self, c, linear="addmm"):
        super().__init__()
        self.linear = linear
        out_in = linear == "F.linear"  # nn.Linear's layout: (out, in)
        d, E, f, o = c["d"], c["E"], c["d_ff"], c["d_out"]
        self.E, self.k, self.expert, self.cf = E, c["k"], c["expert"], c.get("cf")
        self.learned_noise = c["noise"] == "learned"
        self.act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[c["activation"]]
        g = torch.Generator().manual_seed(c.get("seed", 0))

        def param(*shape, std):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * std)

        # Gate and noise weights side by side: one product x · [W_g | W_noise].
        self.W_router = param(d, 2 * E if self.learned_noise else E, std=c["router_std"])
        self.W1 = param(*((E, f, d) if out_in else (E, d, f)), std=1.0 / math.sqrt(d))
        self.W2 = param(*((E, o, f) if out_in else (E, f, o)), std=1.0 / math.sqrt(f))
        self.bias = c.get("bias", True) and self.expert != "swiglu"
        if self.bias:
            self.b1 = torch.nn.Parameter(torch.zeros(E, f))
            self.b2 = torch.nn.Parameter(torch.zeros(E, o))
        if self.expert == "swiglu":
            self.W3 = param(*((E, f, d) if out_in else (E, d, f)), std=1.0 / math.sqrt(d))
        self.d_out = o
        self.alpha = c.get("aux_alpha", 0.01)
        self.router = c.get("router", "topk_softmax")
        self.renormalize = c.get("renormalize", False)
        self.form = "sorted"

    def run_expert(self, e, xe):
        if self.linear == "F.linear":
            b1, b2 = (self.b1[e], self.b2[e]) if self.bias else (None, None)
            if self.expert == "swiglu":
                return F.linear(F.silu(F.linear(xe, self.W1[e])) * F.linear(xe, self.W3[e]), self.W2[e])
            return F.linear(self.act(F.linear(xe, self.W1[e], b1)), self.W2[e], b2)
        if self.expert == "swiglu":
            return (F.silu(xe @ self.W1[e]) * (xe @ self.W3[e])) @ self.W2[e]
        if self.bias and self.linear == "addmm":
            return torch.addmm(self.b2[e], self.act(torch.addmm(self.b1[e], xe, self.W1[e])), self.W2[e])
        if self.bias:  # "x @ W + b"
            return self.act(xe @ self.W1[e] + self.b1[e]) @ self.W2[e] + self.b2[e]
        return self.act(xe @ self.W1[e]) @ self.W2[e]

    def forward(self, x, training):
        T, E, k = x.shape[0], self.E, self.k
        z = x @ self.W_router
        h = z[:, :E]
        H = h + F.softplus(z[:, E:]) * torch.randn_like(h) if training and self.learned_noise else h
        if self.router == "softmax_topk":  # Mixtral / Qwen: softmax over all, then top-k
            gates, top_i = torch.softmax(H, dim=1).topk(k, dim=1)
            if self.renormalize:
                gates = gates / gates.sum(dim=1, keepdim=True)
        else:
            top_v, top_i = H.topk(k, dim=1)  # best first
            gates = torch.softmax(top_v, dim=1)
        if self.form == "loop" and self.cf is None:
            return self.forward_loop(x, H, top_i, gates, training)

        # Assignments in rank-major order (all first choices, then all second choices), then
        # a stable sort by expert: within an expert, rank-major order is kept, which is the
        # order the "position" capacity policy fills slots in.
        flat_e = top_i.t().reshape(-1)
        flat_t = torch.arange(T, device=x.device).repeat(k)
        flat_w = gates.t().reshape(-1)
        order = torch.sort(flat_e, stable=True).indices
        counts = torch.bincount(flat_e, minlength=E)
        if self.cf is not None:
            C = math.ceil(k * T / E * self.cf)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(order.numel()) - starts[flat_e[order]]
            order = order[pos < C]
            counts = counts.clamp(max=C)
        tok = flat_t[order]
        xs = x.index_select(0, tok)  # the one gather

        outs = []
        for e, xe in enumerate(xs.split(counts.tolist())):
            if xe.shape[0] == 0:
                continue
            outs.append(self.run_expert(e, xe))
        out = torch.cat(outs) * flat_w[order].unsqueeze(1)
        # (under autocast the products come out bf16: combined in the input's dtype)
        y = x.new_zeros(T, self.d_out).index_add_(0, tok, out.to(x.dtype))  # the one combine
        return y, self.aux(H, top_i, training), int(order.numel())

    def forward_loop(self, x, H, top_i, gates, training):
        """Dropless only: per expert, the tokens that chose it (any rank) via a mask."""
        y = x.new_zeros(x.shape[0], self.d_out)
        hit = torch.nn.functional.one_hot(top_i, self.E).permute(2, 1, 0)  # (E, k, T)
        for e in torch.nonzero(hit.sum(dim=(1, 2))).flatten().tolist():
            rank, tok = torch.where(hit[e])
            out = self.run_expert(e, x[tok]) * gates[tok, rank].unsqueeze(1)
            y.index_add_(0, tok, out.to(y.dtype))
        return y, self.aux(H, top_i, training), int(top_i.numel())

    def aux(self, H, top_i, training):
        if not training:
            return None
        f_i = torch.bincount(top_i.reshape(-1), minlength=self.E).to(H.dtype) / H.shape[0]
        P_i = torch.softmax(H, dim=1).mean(0)
        return self.alpha * self.E * (f_i * P_i).sum()


def blas_in_use():
    """Which BLAS library this process mapped (torch loads it on the first matmul)."""
    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if ".so" in line}
    except OSError:
        return "unknown"
    for name in sorted(libs):
        base = name.rsplit("/", 1)[-1]
        if "openblas" in name or "blis" in base or "mkl" in base:
            return name
    for name in sorted(libs):
        if name.rsplit("/", 1)[-1].startswith("libblas.so"):
            return name
    return "unknown"


def timed(fn, warmup, repeat):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="JSON object: T, d, d_ff, d_out, E, k, ...")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    c = json.loads(args.case)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(c.get("seed", 0))

    bf16 = c.get("dtype", "fp32") == "bf16"
    g = torch.Generator().manual_seed(12345)
    x32 = torch.randn(c["T"], c["d"], generator=g)
    dy32 = torch.randn(c["T"], c["d_out"], generator=g)
    training = c.get("training", True)
    layers = max(int(c.get("layers", 1)), 1) if not training else 1
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "dtype": "bfloat16" if bf16 else "float32", "layers": layers}
    # bf16: native bf16 tensors or fp32 parameters under autocast; dropless bf16 also tries the
    # loop over experts. fp32 keeps the sorted dispatch.
    dmodes = ["bf16 tensors", "autocast"] if bf16 else ["fp32"]
    dispatches = ["sorted", "loop"] if bf16 and c.get("cf") is None else ["sorted"]

    forms, kept = {}, None
    for linear in linear_forms(c):
        for dmode in dmodes:
            native = dmode == "bf16 tensors"
            dtype = torch.bfloat16 if native else torch.float32
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dmode == "autocast" \
                else contextlib.nullcontext
            # The copies of a cold decode row share nothing: each holds its own weights.
            models = [PeerMoE(c, linear).to(dtype) for _ in range(layers)]
            x, dy = x32.to(dtype), dy32.to(dtype)
            for dispatch in dispatches:
                name = f"{linear}, {dispatch}, {dmode}"
                for m in models:
                    m.form = dispatch
                r = {}
                try:
                    if training:
                        xr = x.detach().requires_grad_(True)
                        model = models[0]
                        with ctx():
                            kept = model(xr, True)[2]

                        def fwd():
                            with ctx():
                                model(xr, True)
                        r["fwd_s"] = timed(fwd, args.warmup, args.repeat)
                        if c.get("backward", True):
                            one = torch.ones((), dtype=dtype)

                            def step():
                                with ctx():
                                    y, aux, _ = model(xr, True)
                                torch.autograd.backward([y, aux], [dy.to(y.dtype), one.to(aux.dtype)])
                            r["fwdbwd_s"] = timed(step, args.warmup, args.repeat)
                        else:
                            r["fwdbwd_s"] = None
                    else:
                        with torch.inference_mode():
                            with ctx():
                                kept = models[0](x, False)[2]

                            def sweep():
                                with ctx():
                                    for m in models:
                                        m(x, False)
                            r["fwd_s"] = timed(sweep, args.warmup, args.repeat) / layers
                        r["fwdbwd_s"] = None
                except Exception as e:  # a form this torch cannot run is listed, not fatal
                    r = {"fwd_s": None, "fwdbwd_s": None, "error": f"{type(e).__name__}: {e}"[:200]}
                forms[name] = r
            del models

    def fastest(key):
        ok = {n: f[key] for n, f in forms.items() if f.get(key) is not None}
        return (min(ok, key=ok.get), min(ok.values())) if ok else (None, None)

    result["form"], result["fwd_s"] = fastest("fwd_s")
    result["form_fwdbwd"], result["fwdbwd_s"] = fastest("fwdbwd_s")
    result["forms"] = forms
    result["kept_rows"] = kept
    result["blas"] = blas_in_use()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
