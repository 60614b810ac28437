#!/usr/bin/env bash
# train_matches.sh MOE NP MPIRUN...: `moe train --expert-parallel` under mpirun -np NP gives
# the per-step training losses and the eval losses of the single-process run with the same
# flags (within 1e-5 relative: the head and router gradients are sums over ranks).
set -eu
moe="$1"; np="$2"; shift 2
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
flags=(--steps 6 --batch 66 --eval-tokens 130 --no-plots --log-every 3 --router-init-std 0.1)
"$moe" train "${flags[@]}" --out "$dir/single" > "$dir/single.log"
"$@" -np "$np" "$moe" train "${flags[@]}" --expert-parallel --out "$dir/dist" > "$dir/dist.log"
cat "$dir/dist.log"
# Only rank 0 prints: one header line, not NP.
test "$(grep -c '^moe train --expert-parallel' "$dir/dist.log")" -eq 1
/usr/bin/python3 - "$dir" <<'PY'
import csv, json, sys
d = sys.argv[1]
rows = lambda p: [float(r["loss"]) for r in csv.DictReader(open(p))]
a, b = rows(d + "/single/metrics.csv"), rows(d + "/dist/metrics.csv")
assert len(a) == len(b) == 6, (len(a), len(b))
sa, sb = json.load(open(d + "/single/summary.json")), json.load(open(d + "/dist/summary.json"))
pairs = list(zip(a, b)) + [(sa["initial_loss"], sb["initial_loss"]), (sa["final_loss"], sb["final_loss"])]
worst = max(abs(x - y) / abs(x) for x, y in pairs)
print(f"train_matches: {len(pairs)} losses, worst relative difference {worst:.2g}")
assert worst <= 1e-5, pairs
PY
