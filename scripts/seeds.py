#!/usr/bin/python3
"""Runs `moe train` over several seeds for a few configurations, one run at a time, and
prints a markdown table of mean ± sd (sample standard deviation over the seeds) of the
train loss (mean of the last tenth of the steps), the final eval loss, the load CV (of the
expert loads summed over the last tenth of the steps, before drops) and the drop rate, then
one line per claim saying on how many seeds it holds.

    /usr/bin/python3 scripts/seeds.py                       # the README table: seeds 0-19
    /usr/bin/python3 scripts/seeds.py --seeds 0-4 --per-seed
    /usr/bin/python3 scripts/seeds.py --config 'α 0.01=' --config 'α 0.1=--aux-alpha 0.1'
    /usr/bin/python3 scripts/seeds.py --seeds 0-4 --precisions fp32,bf16 --threads 2
        # adds eval loss and tokens/s per precision (needs `moe train --precision`; the
        # tokens/s are as measured, so run it on a quiet machine)

Each run's summary.json stays in --work (default /tmp/moe-seeds); a run whose folder
already holds a summary made with the same arguments and binary is not run again (--fresh
reruns everything). Standard library only."""
import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, extra flags of `moe train`: the three models of the README table.
DEFAULT_CONFIGS = [
    ("MoE, 8 experts, top-2", ""),
    ("dense, same active parameters", "--dense"),
    ("MoE without balancing loss or noise", "--aux-alpha 0 --noise none"),
]


def parse_seeds(text):
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise SystemExit("seeds.py: --seeds: no seed given")
    return seeds


def parse_config(text):
    if "=" not in text:
        raise SystemExit(f"seeds.py: --config: expected NAME=FLAGS, got {text!r}")
    name, flags = text.split("=", 1)
    return name.strip(), flags.strip()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_one(binary, bin_digest, args, out_dir, fresh, threads):
    """Runs `moe train ARGS --out OUT_DIR --json --no-plots` unless OUT_DIR already holds
    the summary of the same arguments and binary; returns the summary dict."""
    key = {"args": args, "binary": bin_digest}
    key_path = os.path.join(out_dir, "seeds_key.json")
    summary_path = os.path.join(out_dir, "summary.json")
    if not fresh and os.path.exists(key_path) and os.path.exists(summary_path):
        with open(key_path) as f:
            if json.load(f) == key:
                with open(summary_path) as g:
                    return json.load(g)
    cmd = [binary, "train", *args, "--out", out_dir, "--json", "--no-plots"]
    if threads:
        cmd += ["--threads", str(threads)]
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):  # a stale or unfinished run: start clean
            os.remove(os.path.join(out_dir, name))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seeds.py: {shlex.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(key_path, "w") as f:
        json.dump(key, f)
    return summary


def unclaimed_experts(out_dir):
    """Experts that are no regime's most used one on the final evaluation batch (from
    regime_expert.csv, first and later choices counted); None for the dense model."""
    path = os.path.join(out_dir, "regime_expert.csv")
    with open(path) as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    counts = [[int(v) for v in row[1:]] for row in rows[1:]]
    n_experts = len(counts[0])
    if n_experts < 2:
        return None
    top = {max(range(n_experts), key=lambda e: (row[e], -e)) for row in counts}
    return n_experts - len(top)


def mean_sd(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m = statistics.fmean(values)
    if len(values) < 2:
        return format(m, fmt)
    return f"{format(m, fmt)} ± {format(statistics.stdev(values), fmt)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin", "moe"),
                    help="the moe binary (default: build/bin/moe)")
    ap.add_argument("--seeds", default="0-19", help="e.g. 0-4 or 0,3,5 (default 0-19)")
    ap.add_argument("--config", action="append", type=parse_config, metavar="NAME=FLAGS",
                    help="a configuration: a name and extra `moe train` flags (repeatable; "
                         "default: the README's MoE, dense and unbalanced models)")
    ap.add_argument("--common", default="",
                    help="flags added to every run (e.g. '--steps 1000')")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated; anything but fp32 alone passes --precision P to "
                         "each run and adds a table of eval loss and tokens/s per precision")
    ap.add_argument("--threads", type=int, default=0,
                    help="--threads of each run (0: moe train's default; results do not "
                         "depend on it, speed does)")
    ap.add_argument("--work", default="/tmp/moe-seeds", help="run folders go under it")
    ap.add_argument("--fresh", action="store_true", help="rerun even when a summary exists")
    ap.add_argument("--per-seed", action="store_true", help="also print every run's numbers")
    ap.add_argument("--json-out", help="write every run's numbers to this JSON file")
    a = ap.parse_args()

    binary = os.path.abspath(a.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"seeds.py: --bin: {binary} is not an executable (build it first: "
                         "bash scripts/setup.sh)")
    seeds = parse_seeds(a.seeds)
    configs = a.config or DEFAULT_CONFIGS
    if len({n for n, _ in configs}) != len(configs):
        raise SystemExit("seeds.py: --config: two configurations have the same name")
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    pass_precision = precisions != ["fp32"]
    digest = file_digest(binary)
    common = shlex.split(a.common)

    runs = {}  # (config name, precision) -> list of summaries in seed order
    total = len(configs) * len(precisions) * len(seeds)
    done = 0
    for name, flags in configs:
        for seed in seeds:
            for prec in precisions:  # alternating, so that both precisions see the same load
                args = [*common, *shlex.split(flags), "--seed", str(seed)]
                if pass_precision:
                    args += ["--precision", prec]
                tag = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
                out = os.path.join(a.work, f"{tag}-s{seed}")
                done += 1
                print(f"[{done}/{total}] {name} {prec} seed {seed}", file=sys.stderr, flush=True)
                s = run_one(binary, digest, args, out, a.fresh, a.threads)
                s["unclaimed"] = unclaimed_experts(out)
                runs.setdefault((name, prec), []).append(s)

    def col(summaries, key, dense_none=False):
        return [None if (dense_none and s["config"]["model"]["kind"] == "dense") else s[key]
                for s in summaries]

    seed_text = f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) \
        else ",".join(map(str, seeds))
    print(f"mean ± sd over seeds {seed_text} ({len(seeds)} runs per row), "
          f"{precisions[0]}" + (f", flags {a.common}" if a.common else ""))
    print()
    print("| model | command | active params | train loss (last 10% of steps) | eval loss "
          "| load CV | drop rate % |")
    print("|---|---|---|---|---|---|---|")
    names = [n for n, _ in configs]
    for name, flags in configs:
        ss = runs[(name, precisions[0])]
        cmd = " ".join(["moe train", *common, flags]).strip()
        drops = [None if v is None else 100 * v for v in col(ss, "drop_rate", True)]
        print(f"| {name} | `{cmd}` | {ss[0]['params_active']} "
              f"| {mean_sd(col(ss, 'final_train_loss'), '.4f')} "
              f"| {mean_sd(col(ss, 'final_loss'), '.4f')} "
              f"| {mean_sd(col(ss, 'load_cv', True), '.3f')} "
              f"| {mean_sd(drops, '.2f')} |")

    if pass_precision:
        # One row per model: the mean eval loss per precision, its ratio to fp32's, and the
        # training speed per precision (as measured: quiet the machine for these).
        others = [q for q in precisions if q != "fp32"]
        head = ([f"eval loss {q}" for q in precisions] +
                ([f"{q} / fp32" for q in others] if "fp32" in precisions else []) +
                [f"tokens/s {q}" for q in precisions])
        print()
        print("| model | " + " | ".join(head) + " |")
        print("|---" * (len(head) + 1) + "|")
        for name, _ in configs:
            mean = {q: statistics.fmean(col(runs[(name, q)], "final_loss")) for q in precisions}
            cells = [mean_sd(col(runs[(name, q)], "final_loss"), ".4f") for q in precisions]
            if "fp32" in precisions:
                cells += [format(mean[q] / mean["fp32"], ".3f") for q in others]
            cells += [mean_sd(col(runs[(name, q)], "tokens_per_s"), ".0f") for q in precisions]
            print(f"| {name} | " + " | ".join(cells) + " |")

    if a.per_seed:
        print()
        print("| model | precision | seed | train loss | eval loss | load CV | drop rate % "
              "| unclaimed experts | expert share % (last 10% of steps) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (name, prec), ss in runs.items():
            for seed, s in zip(seeds, ss):
                dense = s["config"]["model"]["kind"] == "dense"
                share = "—" if dense else " ".join(f"{100 * v:.1f}" for v in s["expert_share"])
                print(f"| {name} | {prec} | {seed} | {s['final_train_loss']:.4f} "
                      f"| {s['final_loss']:.4f} | {'—' if dense else format(s['load_cv'], '.3f')} "
                      f"| {'—' if dense else format(100 * s['drop_rate'], '.2f')} "
                      f"| {'—' if dense else s['unclaimed']} | {share} |")

    # What holds seed by seed: the first configuration against each other one.
    if len(configs) >= 2:
        p = precisions[0]
        first, n = runs[(names[0], p)], len(seeds)
        print()
        for oname in names[1:]:
            oss = runs[(oname, p)]
            lower = sum(x["final_loss"] < y["final_loss"] for x, y in zip(first, oss))
            ratio = [y["final_loss"] / x["final_loss"] for x, y in zip(first, oss)]
            line = (f"- {names[0]} against {oname}: lower eval loss on {lower} of {n} seeds "
                    f"(theirs / ours {min(ratio):.2f}–{max(ratio):.2f})")
            if oss[0]["config"]["model"]["kind"] != "dense":
                even = sum(x["load_cv"] < y["load_cv"] for x, y in zip(first, oss))
                fewer = sum(x["drop_rate"] < y["drop_rate"] for x, y in zip(first, oss))
                line += f", lower load CV on {even} of {n}, fewer drops on {fewer} of {n}"
            print(line)
        for name in names:
            ss = runs[(name, p)]
            if ss[0]["unclaimed"] is not None:
                one = sum(s["unclaimed"] == 0 for s in ss)
                print(f"- {name}: every expert is some regime's most used one on {one} of {n} "
                      "seeds")

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([{"config": name, "precision": prec, "seed": seed,
                        **{k: s[k] for k in ("final_loss", "final_train_loss", "load_cv",
                                             "drop_rate", "load_cv_per_step", "eval_load_cv",
                                             "expert_share", "tokens_per_s", "params_active",
                                             "regime_top_expert", "regime_purity",
                                             "unclaimed")}}
                       for (name, prec), ss in runs.items() for seed, s in zip(seeds, ss)],
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
