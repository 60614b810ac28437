"""`moe bench --config generate-qwen3 | generate-gpt-oss`: the arguments it gives
examples/generate.py (read back from a stand-in script named by MOE_GENERATE_SCRIPT that
prints its argv and PYTHONPATH), its refusals, a failing script's status, and one real run of
the script at its --tiny sizes (--quick) with --json. No timing is checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))

pytestmark = pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")

ECHO = """import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "pythonpath": os.environ.get("PYTHONPATH", "")}))
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
"""


def bench(*args, env=None, timeout=120):
    return subprocess.run([MOE, "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture
def echo(tmp_path):
    """Runs moe bench with the stand-in script: (its parsed output, the completed process)."""
    script = tmp_path / "echo_generate.py"
    script.write_text(ECHO)

    def go(*args, status=0):
        r = bench(*args, env={"MOE_GENERATE_SCRIPT": str(script), "MOE_PYTHON": sys.executable,
                              "FAKE_STATUS": str(status)})
        first = r.stdout.splitlines()[0] if r.stdout else "{}"
        return json.loads(first), r

    return go


def options(argv):
    """The script's argv as {option: value} (flags map to True)."""
    out, i = {}, 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[argv[i]] = argv[i + 1]
            i += 2
        else:
            out[argv[i]] = True
            i += 1
    return out


@pytest.mark.parametrize("config,model", [("generate-qwen3", "qwen3"),
                                          ("generate-gpt-oss", "gpt-oss")])
def test_defaults(echo, config, model):
    out, r = echo("--config", config)
    assert r.returncode == 0, r.stderr
    opts = options(out["argv"])
    assert int(opts.pop("--threads")) >= 1  # OMP_NUM_THREADS or the machine's
    assert opts == {"--model": model, "--repeat": "5", "--prompt": "512",
                    "--precisions": "bf16,int8,int4,published"}
    # this build's package first on the script's PYTHONPATH
    first = out["pythonpath"].split(":")[0]
    assert Path(first).resolve() == (Path(MOE).resolve().parent.parent / "python").resolve()
    assert f"moe bench --config {config}: " in r.stdout and "load average" in r.stdout


def test_options_are_passed_on(echo):
    out, r = echo("--config", "generate-gpt-oss", "--threads", "1", "--repeat", "2",
                  "--tokens", "100", "--precision", "bf16,int4,published", "--json")
    assert r.returncode == 0, r.stderr
    assert options(out["argv"]) == {"--model": "gpt-oss", "--threads": "1", "--repeat": "2",
                                    "--prompt": "100", "--precisions": "bf16,int4,published",
                                    "--json": True}
    assert r.stdout.count("\n") == 1  # --json: the script's lines only, no summary line


def test_quick_is_the_tiny_sizes(echo):
    out, r = echo("--config", "generate-qwen3", "--quick", "--precision", "int4")
    assert r.returncode == 0, r.stderr
    opts = options(out["argv"])
    assert opts["--tiny"] is True and opts["--layers"] == "1"
    assert opts["--prompt"] == "16" and opts["--new-tokens"] == "4"
    assert opts["--precisions"] == "int4"


def test_a_failing_script_fails_the_bench(echo):
    _, r = echo("--config", "generate-qwen3", status=3)
    assert r.returncode == 1
    assert "exited with status 3" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--config", "generate-qwen3", "--precision", "int3"], "'int3' is not one of"),
    (["--config", "generate-qwen3", "--model", "/tmp"], "--model: not with --config"),
    (["--config", "B1", "--quick", "--no-peer", "--precision", "published"],
     "'published' is for --config generate-qwen3 / generate-gpt-oss only"),
    (["--config", "generate-llama"], "generate-qwen3 or generate-gpt-oss"),
])
def test_refusals(echo, args, message):
    _, r = echo(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_missing_script_is_an_error(tmp_path):
    r = bench("--config", "generate-qwen3",
              env={"MOE_GENERATE_SCRIPT": str(tmp_path / "absent.py")})
    assert r.returncode == 2 and "no generation script at" in r.stderr


def python_has(module):
    py = os.environ.get("MOE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    return Path(py).exists() and subprocess.run(
        [py, "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.mark.skipif(not python_has("transformers"), reason="no transformers in the project env")
def test_quick_run_of_the_script():
    """The real examples/generate.py at its tiny sizes: one JSON row a variant, then the
    goals (not judged at these sizes)."""
    r = bench("--config", "generate-gpt-oss", "--quick", "--threads", "1", "--repeat", "1",
              "--precision", "bf16,int4,published", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    rows, goals = objs[:-1], objs[-1]["goals"]
    assert [row["variant"] for row in rows] == ["transformers", "libmoe bf16", "libmoe int4",
                                                "libmoe published (mxfp4)"]
    assert all(row["threads"] == 1 and row["prompt"] == 16 and len(row["tokens"]) == 4
               for row in rows)
    assert rows[2]["held_precision"] == "int4" and rows[3]["held_precision"] == "mxfp4"
    assert len(goals) == 3 and all(g["met"] is None for g in goals)
