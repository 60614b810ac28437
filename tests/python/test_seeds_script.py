"""scripts/seeds.py, which makes the README's table of `moe train` over seeds: the mean ± sd
it prints are those of the runs' summaries, the per-seed counts are right, a second call
reuses the runs, and bad arguments give a message naming the option. Tiny runs (20 steps)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))
SCRIPT = ROOT / "scripts" / "seeds.py"

pytestmark = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")

TINY = "--steps 20 --batch 64 --eval-tokens 256"


def seeds_py(tmp_path, *args):
    cmd = [sys.executable, str(SCRIPT), "--bin", MOE, "--work", str(tmp_path / "runs"),
           "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def table_rows(text):
    """The main table's rows: model name → list of cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and "`moe train" in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def ms(values, fmt):
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def test_table_is_mean_and_sd_of_the_runs(tmp_path):
    r = seeds_py(tmp_path, "--seeds", "0-2", "--common", TINY, "--per-seed",
                 "--json-out", str(tmp_path / "runs.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 3 * 3
    assert r.stdout.startswith("mean ± sd over seeds 0–2 (3 runs per row), fp32")
    rows = table_rows(r.stdout)
    assert list(rows) == ["MoE, 8 experts, top-2", "dense, same active parameters",
                          "MoE without balancing loss or noise"]
    for name, cells in rows.items():
        mine = [x for x in runs if x["config"] == name]
        assert [x["seed"] for x in mine] == [0, 1, 2]
        assert cells[1] == "`moe train " + TINY + {"MoE, 8 experts, top-2": "`",
                                                    "dense, same active parameters": " --dense`",
                                                    "MoE without balancing loss or noise":
                                                    " --aux-alpha 0 --noise none`"}[name]
        assert cells[3] == ms([x["final_train_loss"] for x in mine], ".4f")
        assert cells[4] == ms([x["final_loss"] for x in mine], ".4f")
        if name.startswith("dense"):
            assert cells[5] == cells[6] == "—"
        else:
            assert cells[5] == ms([x["load_cv"] for x in mine], ".3f")
            assert cells[6] == ms([100 * x["drop_rate"] for x in mine], ".2f")
    # The seeds differ (a table over one run repeated would have sd 0).
    moe_runs = [x for x in runs if x["config"] == "MoE, 8 experts, top-2"]
    assert len({x["final_loss"] for x in moe_runs}) == 3
    # The counts of what holds, seed by seed.
    dense = [x for x in runs if x["config"] == "dense, same active parameters"]
    lower = sum(a["final_loss"] < b["final_loss"] for a, b in zip(moe_runs, dense))
    assert (f"- MoE, 8 experts, top-2 against dense, same active parameters: lower eval loss "
            f"on {lower} of 3 seeds") in r.stdout
    raw = [x for x in runs if x["config"] == "MoE without balancing loss or noise"]
    even = sum(a["load_cv"] < b["load_cv"] for a, b in zip(moe_runs, raw))
    assert f"lower load CV on {even} of 3" in r.stdout
    # unclaimed: experts that no regime uses most, from each run's regime_expert.csv.
    assert all(0 <= x["unclaimed"] <= 7 for x in moe_runs)
    assert all(x["unclaimed"] is None for x in dense)

    # A second call reuses the runs (same arguments, same binary): nothing is rerun.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")}
    assert len(stamps) == 9
    again = seeds_py(tmp_path, "--seeds", "0-2", "--common", TINY, "--per-seed")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == r.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_own_configurations(tmp_path):
    r = seeds_py(tmp_path, "--seeds", "3,5", "--common", TINY, "--config", "a=--aux-alpha 0.1",
                 "--config", "b=--aux-alpha 0.3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("mean ± sd over seeds 3,5 (2 runs per row)")
    assert list(table_rows(r.stdout)) == ["a", "b"]
    assert "- a against b: lower eval loss on" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--seeds", ","], "--seeds: no seed given"),
    (["--config", "no equals sign"], "--config: expected NAME=FLAGS"),
    (["--config", "a=", "--config", "a=--dense"], "--config: two configurations have the same name"),
    (["--bin", "/nonexistent/moe"], "--bin: /nonexistent/moe is not an executable"),
])
def test_errors_name_the_option(tmp_path, args, message):
    r = seeds_py(tmp_path, *args)
    assert r.returncode != 0
    assert message in r.stderr


def test_a_failing_run_is_reported(tmp_path):
    r = seeds_py(tmp_path, "--seeds", "0", "--common", "--steps 0")
    assert r.returncode != 0
    assert "failed" in r.stderr and "steps: must be at least 1" in r.stderr


def test_precisions_table(tmp_path):
    # A stand-in for a moe that knows --precision: it drops the flag and runs the real one, so
    # both precisions give the same losses and the ratio must read 1.000.
    fake = tmp_path / "moe"
    fake.write_text(f"""#!{sys.executable}
import os, sys
a = sys.argv[1:]
if "--precision" in a:
    i = a.index("--precision")
    assert a[i + 1] in ("fp32", "bf16"), a
    del a[i:i + 2]
os.execv({MOE!r}, [{MOE!r}, *a])
""")
    fake.chmod(0o755)
    r = seeds_py(tmp_path, "--bin", str(fake), "--seeds", "0-1", "--common", TINY,
                 "--precisions", "fp32,bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("| model | eval loss fp32 | eval loss bf16 | bf16 / fp32 | tokens/s fp32 "
            "| tokens/s bf16 |") in r.stdout
    rows = [line for line in r.stdout.splitlines()
            if line.startswith("| MoE, 8 experts, top-2 | ") and "`" not in line]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == cells[2] and cells[3] == "1.000"
