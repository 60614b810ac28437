#!/usr/bin/env bash
# Runs bench_router and its PyTorch peer side by side (2 threads each) and prints the
# markdown table of docs/benchmarks.md. Usage: bench/run_router_bench.sh [build dir]
set -euo pipefail
BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMP_NUM_THREADS=2
"$BUILD/bin/bench_router" --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  --benchmark_min_time=0.5 --benchmark_out="$OUT/ours.json" --benchmark_out_format=json >&2
PY="${MOE_PYTHON:-$HERE/../.venv/bin/python}"  # the project environment (scripts/setup.sh)
OPENBLAS_CORETYPE=Cooperlake "$PY" "$HERE/peers/router_peer.py" > "$OUT/peer.jsonl"
"$PY" - "$OUT/ours.json" "$OUT/peer.jsonl" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))["benchmarks"]
peer = {(r["E"], r["k"]): r for r in map(json.loads, open(sys.argv[2]))}

def med(name):  # median aggregate of a benchmark
    for b in ours:
        if b.get("run_name") == name and b.get("aggregate_name") == "median":
            return b
    raise KeyError(name)

print("| E | k | GEMM ms (GFLOP/s) | select+softmax ms | torch topk+softmax ms | speed-up |"
      " +probs ms | torch +probs ms | speed-up | route eval ms | route/GEMM | tokens/s |"
      " train GEMM ms | route train ms | route/GEMM |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for E in (8, 64, 256):
    for k in (1, 2, 8):
        p = peer[(E, k)]
        s0 = med(f"BM_SelectSoftmax/{E}/{k}/0")["real_time"]
        s1 = med(f"BM_SelectSoftmax/{E}/{k}/1")["real_time"]
        ev = med(f"BM_RouteEval/{E}/{k}/manual_time")
        tr = med(f"BM_RouteTrain/{E}/{k}/manual_time")
        print(f"| {E} | {k} | {ev['gemm_ms']:.1f} ({ev['gemm_GFLOPs']:.0f}) | {s0:.2f} |"
              f" {p['topk_softmax_ms']:.2f} | {p['topk_softmax_ms'] / s0:.1f}x | {s1:.2f} |"
              f" {p['topk_softmax_probs_ms']:.2f} | {p['topk_softmax_probs_ms'] / s1:.1f}x |"
              f" {ev['route_ms']:.1f} | {ev['route_over_gemm']:.2f} |"
              f" {ev['tokens_per_s'] / 1e6:.2f}M | {tr['gemm_ms']:.1f} | {tr['route_ms']:.1f} |"
              f" {tr['route_over_gemm']:.2f} |")
sg = {b["run_name"]: b for b in ours if b.get("aggregate_name") == "median" and b["run_name"].startswith("BM_Sgemm")}
print()
print("Machine GEMM (one oneDNN sgemm call, (16384, 1024)·(1024, N)): " + ", ".join(
    f"N={n}: {sg[f'BM_Sgemm/{n}']['GFLOPs'] / 1e9:.0f} GFLOP/s" for n in (8, 16, 64, 128, 256, 512)
    if f"BM_Sgemm/{n}" in sg) + ".  torch x@W_g: " + ", ".join(
    f"E={E}: {peer[(E, 1)]['gemm_GFLOPs']:.0f} GFLOP/s" for E in (8, 64, 256)) + ".")
PY
