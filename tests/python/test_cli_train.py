"""`moe train`: small, fast versions of the default run. The loss falls
well below its start; the balancing loss with noise keeps the expert load balanced where
`--aux-alpha 0 --noise none` does not; a seed reproduces the run; the run folder holds what
it should. Runs use --threads 1 so that they stay quick on a busy machine (results do not
depend on the thread count, which one test checks)."""
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))

pytestmark = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")

SMALL = ["--steps", "200", "--batch", "128", "--eval-tokens", "1024", "--threads", "1"]
# Fields that are timings, or where the run was written; everything else is deterministic.
NOT_REPRODUCIBLE = {"tokens_per_s", "timing", "run_dir"}


def train(tmp_path, *args, plots=False, name="run"):
    out = tmp_path / name
    cmd = [MOE, "train", *SMALL, *args, "--out", str(out), "--json"]
    if not plots:
        cmd.append("--no-plots")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().split("\n")
    assert len(lines) == 1, "--json must print one JSON object and nothing else on stdout"
    summary = json.loads(lines[0])
    return summary, out


def test_loss_falls_well_below_its_start(tmp_path):
    s, _ = train(tmp_path)
    for key in ("initial_loss", "final_loss", "load_cv", "drop_rate", "tokens_per_s", "steps"):
        assert key in s
    assert s["steps"] == 200
    # The targets are standardised: the untrained model (zero head) scores about 1.
    assert 0.8 < s["initial_loss"] < 1.2
    assert s["final_loss"] < 0.4 * s["initial_loss"], s
    assert s["final_train_loss"] < 0.4 * s["first_train_loss"], s


def test_moe_beats_dense_on_the_regime_task(tmp_path):
    moe, _ = train(tmp_path, "--steps", "400", name="moe")
    dense, _ = train(tmp_path, "--steps", "400", "--dense", name="dense")
    assert dense["config"]["model"]["kind"] == "dense"
    assert dense["config"]["model"]["n_experts"] == 1
    assert dense["config"]["model"]["d_ff"] == moe["config"]["model"]["k"] * 64
    # Same expert weights per token: the active counts differ by the router (W_g and W_noise
    # are d × E for the MoE, W_g is d × 1 for the dense model) and by the k output biases b2
    # that the MoE's k experts add where the dense model has one.
    d, E, k = 32, moe["config"]["model"]["n_experts"], moe["config"]["model"]["k"]
    assert moe["params_active"] - 2 * d * E - (k - 1) * d == dense["params_active"] - d
    assert moe["final_loss"] < dense["final_loss"], (moe["final_loss"], dense["final_loss"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balancing_loss_and_noise_keep_the_load_balanced(tmp_path, seed):
    # More experts than regimes: without balancing the router settles on a few experts.
    common = ["--experts", "16", "--regimes", "4", "--steps", "300", "--seed", str(seed)]
    bal, _ = train(tmp_path, *common, "--aux-alpha", "0.05", name="bal")
    raw, _ = train(tmp_path, *common, "--aux-alpha", "0", "--noise", "none", name="raw")
    assert bal["load_cv"] < 0.45, bal["load_cv"]
    assert raw["load_cv"] > 1.8 * bal["load_cv"], (bal["load_cv"], raw["load_cv"])
    assert raw["drop_rate"] > bal["drop_rate"]


def test_k1_without_balancing_collapses_onto_one_expert(tmp_path):
    # With k = 1 the gate weight is always 1, so only the balancing loss and the noise move the
    # router; without them every token stays on the expert that wins the initial tie.
    E = 8
    bal, _ = train(tmp_path, "--k", "1", name="bal")
    raw, _ = train(tmp_path, "--k", "1", "--aux-alpha", "0", "--noise", "none", name="raw")
    assert raw["load_cv"] == pytest.approx((E - 1) ** 0.5, rel=1e-4)
    assert bal["load_cv"] < 0.2
    assert raw["expert_share"][E - 1] == pytest.approx(1.0)


def strip(summary):
    return {k: v for k, v in summary.items() if k not in NOT_REPRODUCIBLE}


def test_same_seed_same_numbers(tmp_path):
    a, da = train(tmp_path, "--seed", "5", name="a")
    b, db = train(tmp_path, "--seed", "5", name="b")
    c, _ = train(tmp_path, "--seed", "6", name="c")
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)
    assert a["final_loss"] != c["final_loss"]

    def columns(path):  # metrics.csv without the timing column
        rows = [r.split(",") for r in (path / "metrics.csv").read_text().splitlines()]
        i = rows[0].index("tokens_per_s")
        return [r[:i] + r[i + 1:] for r in rows]
    assert columns(da) == columns(db)
    assert (da / "regime_expert.csv").read_text() == (db / "regime_expert.csv").read_text()
    assert (da / "model.safetensors").read_bytes() == (db / "model.safetensors").read_bytes()


def test_thread_count_does_not_change_the_numbers(tmp_path):
    one, _ = train(tmp_path, "--steps", "50", name="one")
    cmd_two = ["--steps", "50", "--threads", "2"]  # the later --threads wins
    two, _ = train(tmp_path, *cmd_two, name="two")
    assert strip(one)["final_loss"] == strip(two)["final_loss"]
    assert {k: v for k, v in strip(one).items() if k != "config"} == \
        {k: v for k, v in strip(two).items() if k != "config"}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return w, h


def test_run_folder_contents(tmp_path):
    s, out = train(tmp_path, "--steps", "60", plots=True)
    for f in ("metrics.csv", "summary.json", "regime_expert.csv", "model.safetensors"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp*")), "temporary files left behind"
    on_disk = json.loads((out / "summary.json").read_text())
    assert strip(on_disk) == strip(s)

    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:6] == ["step", "loss", "aux_loss", "tokens_per_s", "load_cv", "drop_rate"]
    E = s["config"]["model"]["n_experts"]
    assert header[6:] == [f"share_{e}" for e in range(E)]
    assert len(rows) == 1 + 60
    for r in rows[1:]:
        v = [float(x) for x in r.split(",")]
        assert abs(sum(v[6:]) - 1.0) < 1e-4  # shares of the routed assignments

    counts = [r.split(",") for r in (out / "regime_expert.csv").read_text().splitlines()]
    assert len(counts) == 1 + s["config"]["task"]["regimes"]
    total = sum(int(x) for r in counts[1:] for x in r[1:])
    assert total == 1024 * s["config"]["model"]["k"]

    blob = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    for name in ("W_g", "W_noise", "W1", "b1", "W2", "b2", "head.W", "head.b"):
        assert name in header, name
    assert header["head.W"]["shape"] == [32, 8]

    try:
        # The interpreter moe train runs the plots with (cli/run_files.hpp, project_python).
        venv = ROOT / ".venv" / "bin" / "python"
        python = os.environ.get("MOE_PYTHON") or (str(venv) if os.access(venv, os.X_OK)
                                                  else "/usr/bin/python3")
        subprocess.run([python, "-c", "import matplotlib"], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("matplotlib not installed: plots are skipped by design")
    for png in ("loss.png", "experts.png", "specialisation.png"):
        w, h = png_size(out / png)
        assert w > 100 and h > 100


def test_plain_progress_lines_and_summary_when_not_a_terminal(tmp_path):
    r = subprocess.run([MOE, "train", *SMALL, "--steps", "40", "--log-every", "10", "--no-plots",
                        "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "\x1b" not in r.stdout
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/40", "10/40", "20/40", "30/40", "40/40"]
    for word in ("loss", "tokens/s", "load_cv", "drop"):
        assert word in steps[0]
    assert "summary" in r.stdout and "eval loss" in r.stdout


def test_default_run_folder_is_fresh(tmp_path):
    cmd = [MOE, "train", *SMALL, "--steps", "5", "--no-plots", "--json"]
    a = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    b = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    da, db = json.loads(a.stdout)["run_dir"], json.loads(b.stdout)["run_dir"]
    assert da != db and da.startswith("runs/") and db.startswith("runs/")
    assert (tmp_path / da / "summary.json").is_file() and (tmp_path / db / "summary.json").is_file()


@pytest.mark.parametrize("args,field", [
    (["--k", "0"], "k"),
    (["--k", "9"], "k"),
    (["--experts", "0"], "n_experts"),
    (["--capacity-factor", "abc"], "capacity_factor"),
    (["--capacity-factor", "-1"], "capacity_factor"),
    (["--expert", "conv"], "expert"),
    (["--drop-policy", "lifo"], "drop"),
    (["--noise", "loud"], "noise"),
    (["--steps", "0"], "steps"),
    (["--lr", "-1"], "lr"),
    (["--steps", "ten"], "steps"),
    (["--bogus"], "bogus"),
])
def test_bad_flags_exit_2_one_line(tmp_path, args, field):
    r = subprocess.run([MOE, "train", *args, "--out", str(tmp_path / "x"), "--no-plots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().split("\n")
    assert len(lines) == 1 and field in lines[0], r.stderr
    assert not (tmp_path / "x" / "summary.json").exists()


def test_missing_matplotlib_is_reported_and_the_run_completes(tmp_path):
    fake = tmp_path / "plot_run.py"
    fake.write_text("import sys\nsys.exit(3)  # what scripts/plot_run.py does without matplotlib\n")
    env = dict(os.environ, MOE_PLOT_SCRIPT=str(fake))
    r = subprocess.run([MOE, "train", *SMALL, "--steps", "5", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "matplotlib" in r.stdout
    assert (tmp_path / "r" / "summary.json").is_file()
