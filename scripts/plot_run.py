#!/usr/bin/env python3
"""Plots of a `moe train` run folder: loss.png (the loss curve), experts.png (each expert's
share of the routed tokens over the steps) and specialisation.png (regime × expert heat map
of the final evaluation batch).

    .venv/bin/python scripts/plot_run.py RUN_DIR

Exit status: 0 plots written, 2 bad run folder, 3 matplotlib (or numpy) is not installed.
Each PNG is written to a temporary name and renamed, so a reader never sees half a file.
"""
import csv
import json
import os
import sys


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [[float(v) for v in r] for r in rows[1:] if r]


def smooth(values, width):
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def save(fig, path):
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2 if len(argv) != 2 else 0
    run = argv[1]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as e:
        print(f"plot_run.py: matplotlib is not available ({e}); no plots", file=sys.stderr)
        return 3
    try:
        header, rows = read_csv(os.path.join(run, "metrics.csv"))
    except (OSError, ValueError, IndexError) as e:
        print(f"plot_run.py: cannot read {run}/metrics.csv: {e}", file=sys.stderr)
        return 2
    summary = {}
    try:
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        pass
    model = summary.get("config", {}).get("model", {})
    title = (f"{model.get('kind', 'moe')}: {model.get('n_experts', '?')} × {model.get('expert', '?')}"
             f", k={model.get('k', '?')}" if model else os.path.basename(run.rstrip("/")))

    col = {name: i for i, name in enumerate(header)}
    m = np.array(rows) if rows else np.zeros((0, len(header)))
    steps = m[:, col["step"]]
    width = max(1, len(steps) // 50)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, m[:, col["loss"]], color="#9ecae1", lw=0.8, label="training loss (per step)")
    ax.plot(steps, smooth(list(m[:, col["loss"]]), width), color="#08519c", lw=1.8,
            label=f"moving average ({width} steps)")
    if "initial_loss" in summary and "final_loss" in summary and len(steps):
        ax.scatter([0, steps[-1]], [summary["initial_loss"], summary["final_loss"]],
                   color="#d62728", zorder=3, label="evaluation loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(f"Loss — {title}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save(fig, os.path.join(run, "loss.png"))
    plt.close(fig)

    shares = [h for h in header if h.startswith("share_")]
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("tab20" if len(shares) > 10 else "tab10")
    for i, h in enumerate(shares):
        ax.plot(steps, smooth(list(m[:, col[h]]), width), lw=1.2, color=cmap(i % cmap.N),
                label=h.replace("share_", "expert "))
    if shares:
        ax.axhline(1.0 / len(shares), color="black", ls="--", lw=1, label="balanced")
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed assignments")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Expert load — {title}")
    ax.grid(alpha=0.3)
    if len(shares) <= 16:
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    save(fig, os.path.join(run, "experts.png"))
    plt.close(fig)

    try:
        rheader, counts = read_csv(os.path.join(run, "regime_expert.csv"))
    except (OSError, ValueError, IndexError):
        counts = []
    if counts:
        c = np.array(counts)[:, 1:]
        # Each token makes k assignments: dividing by the regime's token count gives the
        # fraction of its tokens that use each expert (1.0: every token of the regime).
        k = max(int(model.get("k", 1)), 1)
        frac = c / np.maximum(c.sum(1, keepdims=True) / k, 1)
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * c.shape[1], 1.0 + 0.45 * c.shape[0]))
        im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        if c.size <= 400:
            for r in range(c.shape[0]):
                for e in range(c.shape[1]):
                    ax.text(e, r, f"{frac[r, e]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if frac[r, e] < 0.6 else "black")
        ax.set_xticks(range(c.shape[1]))
        ax.set_yticks(range(c.shape[0]))
        ax.set_xlabel("expert")
        ax.set_ylabel("regime")
        ax.set_title(f"Fraction of each regime's tokens routed to each expert\n"
                     f"(top-{k}, final evaluation batch)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        save(fig, os.path.join(run, "specialisation.png"))
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
