"""`moe bench --model` and `--config real-models` smoke tests at small sizes: a checkpoint's
block is loaded by the loader and timed beside its roofs, with a decode row and its load time
against reading its bytes; the transformers peer script runs. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))
PY = sys.executable

pytestmark = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")
torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")


def run(*args, timeout=900):
    r = subprocess.run([MOE, "bench", "--threads", "2", "--repeat", "1", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def quick_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def test_real_models_quick(quick_dirs):
    r = run("--config", "real-models", "--quick", "--no-peer", "--json", "--workdir",
            str(quick_dirs))
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    names = [row["name"] for row in rows]
    decode = ["decode", "decode-T4", "decode-T16"]
    assert names == [f"ckpt-{m}-{s}" for m in ("Qwen3-30B-A3B", "Mixtral-8x7B")
                     for s in ["T32"] + decode], names
    for row in rows:
        assert row["precision"] == "bf16" and row["fwd_s"] > 0
        assert row["model_layer"] == 0 and Path(row["model_dir"]).is_dir()
    prefill = [row for row in rows if "decode" not in row["name"]]
    for row in prefill:  # load time beside the time to read the same bytes
        assert row["load_s"] > 0 and row["disk_read_s"] > 0 and row["block_file_bytes"] > 0
    # the checkpoints are sharded with an index, as published ones are
    qdir = quick_dirs / "Qwen3-30B-A3B-quick"
    assert (qdir / "model.safetensors.index.json").exists()
    assert len(list(qdir.glob("*.safetensors"))) > 1
    assert "load within 1.5x of reading its bytes" in r.stderr
    assert "within 1.2x of its memory roof" in r.stderr


def test_model_folder_with_peer(quick_dirs, tmp_path):
    """--model on a folder written by the checkpoint script, with the transformers peer."""
    d = tmp_path / "mix"
    subprocess.run([PY, str(ROOT / "bench/peers/make_checkpoint.py"), "--model", "Mixtral-8x7B",
                    "--out", str(d), "--quick"], check=True, capture_output=True)
    r = run("--model", str(d), "--layer", "0", "--tokens", "16", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [row["name"] for row in rows] == ["model-T16", "model-decode", "model-decode-T4"]
    for row in rows[1:]:  # decode rows: cold, and the peer rotated over as many copies
        assert row["cold_layers"] >= 1
    assert rows[0]["peer_fwd_s"] > 0, r.stderr
    assert "prefill >= 3x faster than transformers" in r.stderr


def test_model_needs_layer(tmp_path):
    r = subprocess.run([MOE, "bench", "--model", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "--layer" in r.stderr


def test_hf_block_peer_script(tmp_path):
    d = tmp_path / "q"
    subprocess.run([PY, str(ROOT / "bench/peers/make_checkpoint.py"), "--model",
                    "Qwen3-30B-A3B", "--out", str(d), "--quick"], check=True, capture_output=True)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 128
    r = subprocess.run([PY, str(ROOT / "bench/peers/hf_block.py"), "--model", str(d), "--layer",
                        "0", "--tokens", "8", "--repeat", "1", "--impls", "eager,grouped_mm"],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["fwd_s"] > 0 and res["impl"] in ("eager", "grouped_mm")
