#!/usr/bin/env python3
"""What moe.torch.MoE costs over the bare library, for `moe bench --config module`.

B1 (T 4096, d 1024, d_ff 2048, E 16, k 2, cf 1.25, learned noise) in fp32 and bf16: the same
layer driven through `moe.MoE` (NumPy in and out: forward, backward) and through the module
(torch tensors, autograd: y = module(x); (y·dy).sum() + aux + z backward; both clear their
gradients before each step, as a training loop does), timed interleaved
(bare, module, bare, module, ...) so that the machine's drift cancels in the ratio.
Prints one JSON object per precision: bare and module seconds (medians), and their ratios.

Usage: module_overhead.py [--threads N] [--repeat R] [--quick] [--precision fp32,bf16]
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

import moe
import moe.torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated precisions")
    args = ap.parse_args()
    if args.threads > 0:
        moe.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    T, d, f, E = (256, 64, 128, 8) if args.quick else (4096, 1024, 2048, 16)
    kw = dict(d_ff=f, capacity_factor=1.25, noise="learned", router_init_std=d ** -0.5, seed=1)
    rng = np.random.default_rng(0)
    x_np = rng.uniform(-1, 1, (T, d)).astype(np.float32)
    dy_np = rng.uniform(-1, 1, (T, d)).astype(np.float32)
    for precision in args.precision.split(","):
        bare = moe.MoE(d, E, 2, precision=precision, **kw)
        mod = moe.torch.MoE(d, E, 2, precision=precision, **kw)
        x, dy = torch.from_numpy(x_np), torch.from_numpy(dy_np)

        def bare_fwd():
            bare.forward(x_np)

        # A training step's share: each side clears its gradients first, as a training loop
        # does (optimizer.zero_grad() sets the module's to None; the bare layer zeroes its own).
        def bare_fb():
            bare.zero_grad()
            bare.forward(x_np)
            bare.backward(dy_np)

        def mod_fwd():
            with torch.no_grad():
                mod(x)

        def mod_fb():
            mod.zero_grad(set_to_none=True)
            y = mod(x)
            ((y * dy).sum() + mod.aux_loss + mod.z_loss).backward()

        samples = {k: [] for k in ("bare_fwd", "mod_fwd", "bare_fb", "mod_fb")}
        fns = {"bare_fwd": bare_fwd, "mod_fwd": mod_fwd, "bare_fb": bare_fb, "mod_fb": mod_fb}
        for f_ in fns.values():  # warm-up
            f_()
        for _ in range(args.repeat):
            for name, f_ in fns.items():
                t0 = time.perf_counter()
                f_()
                samples[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in samples.items()}
        ratio_fwd = statistics.median(m / b for m, b in zip(samples["mod_fwd"], samples["bare_fwd"]))
        ratio_fb = statistics.median(m / b for m, b in zip(samples["mod_fb"], samples["bare_fb"]))
        json.dump({"name": "module-B1", "precision": precision, "T": T, "repeat": args.repeat,
                   "threads": torch.get_num_threads(), **{k + "_s": v for k, v in med.items()},
                   "overhead_fwd": ratio_fwd - 1.0, "overhead_fwdbwd": ratio_fb - 1.0},
                  sys.stdout)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
