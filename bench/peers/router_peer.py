"""PyTorch peer of bench/bench_router.cpp: the same shapes (T = 16384, d = 1024,
E in {8, 64, 256}, k in {1, 2, 8}), timed the same way (best-of and mean over repeats of
wall time per call, after a warm-up).

  topk_softmax        torch.topk(H, k) + softmax over the kept values (the select+softmax
                      part; compare with BM_SelectSoftmax/E/k/0)
  topk_softmax_probs  the same plus softmax over all E, as routing needs for the balancing
                      loss (compare with BM_SelectSoftmax/E/k/1)
  gemm                x @ W_g, the router's GEMM (torch's own BLAS)
  route               x @ W_g, then topk, softmax and the full softmax

Run: OPENBLAS_CORETYPE=Cooperlake OMP_NUM_THREADS=2 .venv/bin/python bench/peers/router_peer.py
Prints one JSON object per line.
"""
import json
import os
import sys
import time

import torch

T, D = 16384, 1024
THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))


def timed(fn, min_time=0.5, min_reps=5):
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), sum(times) / len(times)


def main():
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=gen)
    for E in (8, 64, 256):
        W = torch.randn(D, E, generator=gen) * 0.03
        H = torch.randn(T, E, generator=gen)
        for k in (1, 2, 8):
            def topk_softmax():
                v, i = torch.topk(H, k, dim=1)
                return torch.softmax(v, dim=1), i

            def topk_softmax_probs():
                v, i = torch.topk(H, k, dim=1)
                return torch.softmax(v, dim=1), i, torch.softmax(H, dim=1)

            def gemm():
                return x @ W

            def route():
                h = x @ W
                v, i = torch.topk(h, k, dim=1)
                return torch.softmax(v, dim=1), i, torch.softmax(h, dim=1)

            row = {"E": E, "k": k, "threads": torch.get_num_threads()}
            for name, fn in (("topk_softmax", topk_softmax),
                             ("topk_softmax_probs", topk_softmax_probs),
                             ("gemm", gemm), ("route", route)):
                best, mean = timed(fn)
                row[name + "_ms"] = best * 1e3
                row[name + "_mean_ms"] = mean * 1e3
            row["gemm_GFLOPs"] = 2.0 * T * D * E / (row["gemm_ms"] / 1e3) / 1e9
            print(json.dumps(row))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
