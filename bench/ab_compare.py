#!/usr/bin/env python3
"""Two builds of `moe` timed against each other: `moe bench --json` of each, interleaved
(the order alternates every round, so a drift of the machine falls on both), and the median
of each figure per build with their ratio. What a claim of "no regression" or "faster" rests
on: docs/benchmarks.md quotes its output with the command.

  python3 bench/ab_compare.py OLD_MOE NEW_MOE --rounds 6 -- --config B1 --precision bf16

Everything after `--` goes to `moe bench` (with --threads 2 --repeat 3 --no-peer --no-dist
--json added unless given). OMP_NUM_THREADS is set to the bench's thread count."""
import argparse
import json
import os
import statistics
import subprocess
import sys

FIGURES = ("fwd_s", "fwdbwd_s", "expert_s", "ratio_fwd", "ratio_fwdbwd")


def run(exe, args, env):
    r = subprocess.run([exe, "bench", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{exe} bench failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {(row["name"], k): row[k] for row in rows for k in FIGURES if row.get(k) is not None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=6)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    args = argv[cut + 1:]
    for flag, value in (("--threads", "2"), ("--repeat", "3")):
        if flag not in args:
            args += [flag, value]
    for flag in ("--no-peer", "--no-dist", "--json"):
        if flag not in args:
            args.append(flag)
    env = dict(os.environ, OMP_NUM_THREADS=args[args.index("--threads") + 1])
    builds = {"old": a.old, "new": a.new}
    samples = {"old": {}, "new": {}}
    for i in range(a.rounds):
        order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
        for b in order:
            for key, v in run(builds[b], args, env).items():
                samples[b].setdefault(key, []).append(v)
    print(f"moe bench {' '.join(args)}: {a.rounds} interleaved rounds, medians")
    for key in sorted(samples["new"]):
        o, n = samples["old"].get(key), samples["new"][key]
        if not o:
            continue
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"{key[0]:18s} {key[1]:13s} old {mo:9.4f}  new {mn:9.4f}  new/old {mn / mo:6.3f}"
              f"  (old {min(o):.4f}..{max(o):.4f}, new {min(n):.4f}..{max(n):.4f})")


if __name__ == "__main__":
    main()
