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


# ---- --precision auto: the folder's stored format ---------------------------------------------

def stored_folder(tmp_path, fmt):
    """A tiny folder in one stored format, its MoE layer and the precision "auto" keeps."""
    sys.path.insert(0, str(ROOT / "tests" / "python"))
    import pretrained_folders as pf
    path = str(tmp_path / fmt)
    if fmt == "bf16":
        c = pf.tiny_config("mixtral")
        pf.write_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (0, 1)}, dtype="BF16")
        return path, 1, "bf16", "bf16"
    if fmt == "fp8":
        c = pf.tiny_config("deepseek_v3", quantization_config={
            "quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"})
        pf.write_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (1, 2)},
                        fp8=(128, 128))
        return path, 2, "fp8", "fp8 e4m3 (block 128x128)"
    if fmt == "mxfp4":
        c = pf.tiny_config("gpt_oss", quantization_config={"quant_method": "mxfp4"})
        pf.write_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (0, 1)},
                        stacked=True, mxfp4=True)
        return path, 1, "mxfp4", "mxfp4 (e2m1, e8m0 scale per 32)"
    c = pf.tiny_config("qwen3_moe", hidden_size=64, moe_intermediate_size=64)
    pf.write_int4_folder(path, c, {l: pf.random_weights(c, seed=l) for l in (0, 1)},
                         method=fmt, group=32)
    return path, 1, "int4", "gptq int4 g32 sym (v1 zeros)" if fmt == "gptq" else \
        "awq int4 g32 (gemm)"


def bench_tiny(path, layer, *extra):
    """One --model run at the smallest sizes: T = 2 and decode, one repeat, no peers, no cold
    copies."""
    r = subprocess.run([MOE, "bench", "--model", path, "--layer", str(layer), "--tokens", "2",
                        "--quick", "--no-peer", "--repeat", "1", "--cold-margin", "0",
                        "--threads", "1", *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "mxfp4", "gptq", "awq"])
def test_model_precision_auto_is_the_stored_format(tmp_path, fmt):
    path, layer, precision, words = stored_folder(tmp_path, fmt)
    # --model without --precision: auto, each row in the stored format and saying so
    rows = [json.loads(line) for line in bench_tiny(path, layer, "--json").stdout.splitlines()
            if line.strip()]
    assert [row["name"] for row in rows] == ["model-T2", "model-decode"]
    for row in rows:
        assert row["precision"] == precision and row["fwd_s"] > 0
        assert row["precision_asked"] == "auto" and row["stored_format"] == words
    # --precision auto, the table: the header names what auto resolved to, the rows carry it
    out = bench_tiny(path, layer, "--precision", "auto").stdout
    assert f"model: {path}, layer {layer}, precision auto = {precision} (experts stored as " \
           f"{words})" in out, out
    labels = [line.split()[:2] for line in out.splitlines() if line.lstrip().startswith("model-")]
    assert labels == [["model-T2", precision], ["model-decode", precision]], out


def test_model_precision_auto_beside_a_named_one(tmp_path):
    path, layer, _, words = stored_folder(tmp_path, "gptq")
    rows = [json.loads(line) for line in
            bench_tiny(path, layer, "--precision", "auto,bf16", "--json").stdout.splitlines()
            if line.strip()]
    assert [(r["name"], r["precision"], r.get("stored_format")) for r in rows] == [
        ("model-T2", "int4", words), ("model-decode", "int4", words),
        ("model-T2", "bf16", None), ("model-decode", "bf16", None)]


@pytest.mark.parametrize("args", [["--config", "B1"], [], ["--config", "real-models"],
                                  ["--config", "generate-qwen3"]])
def test_precision_auto_needs_model(args):
    r = subprocess.run([MOE, "bench", "--precision", "auto", "--quick", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "moe: --precision: 'auto' (the folder's stored format) is for " \
                               "--model only", r.stderr


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
