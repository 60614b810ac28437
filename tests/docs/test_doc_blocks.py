"""Every fenced example of README.md and docs/ runs in the test suite (issue 22).

```python fences run under pytest-codeblocks (doc_plugin.py); this file runs the ```sh fences
(bash -euo pipefail, from a sandbox folder linking the repository's build/, scripts/, ...;
long commands on the stand-ins of doc_blocks.STAND_INS for blocks marked `quick`) and checks
every other fence by the marker before it. A fence with no way to be checked fails
test_every_fence_is_checked."""
import json
import os
import pathlib
import re
import struct
import subprocess

import pytest

import doc_blocks as db

ROOT = db.ROOT
MOE = ROOT / "build" / "bin" / "moe"
BLOCKS = db.all_blocks()
LINKS = ["build", "scripts", "bench", "examples", "python", "tests", "include", "docs", ".ci",
         ".venv", "CMakePresets.json", "CMakeLists.txt", "cmake", "src", "cli", "pyproject.toml",
         "README.md", "fuzz"]

# Named checks of fences that are not commands (marker checked-by= / output-of=).
CHECKS = {}


def check(name):
    def reg(f):
        CHECKS[name] = f
        return f
    return reg


def sandbox(tmp_path):
    box = tmp_path / "repo"
    box.mkdir()
    for name in LINKS:
        if (ROOT / name).exists():
            (box / name).symlink_to(ROOT / name)
    return box


def run_bash(code, cwd, env_extra=None, timeout=600):
    env = dict(os.environ, DOCTEST_TMP=str(cwd.parent), OMP_NUM_THREADS="2",
               **(env_extra or {}))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n--- ran:\n{code}\n--- stdout:\n{r.stdout[-3000:]}\n--- stderr:\n{r.stderr[-3000:]}"
    return r.stdout


def expected_output(block):
    """Full-line comments after the last command of a sh block: the block's expected stdout."""
    lines = block.code.rstrip("\n").splitlines()
    tail = []
    while lines and lines[-1].startswith("# "):
        tail.insert(0, lines.pop()[2:])
    return ("\n".join(tail) + "\n") if tail else None


def ci_text():
    text = (ROOT / ".ci" / "run").read_text()
    for script in re.findall(r"bash (scripts/\w+\.sh)", text):
        text += (ROOT / script).read_text()
    return text


def kind(block):
    k = block.keys
    if "run-by" in k:
        return "run-by"
    if "output-of" in k or "checked-by" in k:
        return "check"
    if block.lang == "python":
        return "codeblocks"
    if block.lang == "sh":
        return "sh"
    return None


def test_every_fence_is_checked():
    unchecked = [b.name for b in BLOCKS if kind(b) is None]
    assert not unchecked, f"fences with no test (add a doc-test marker): {unchecked}"
    names = {b.keys.get("output-of") or b.keys.get("checked-by") for b in BLOCKS} - {None}
    assert names <= set(CHECKS), f"markers naming no check: {names - set(CHECKS)}"
    for b in BLOCKS:
        if "run-by" in b.keys:
            script = (ROOT / b.keys["run-by"]).read_text()
            assert f"extract {b.path.relative_to(ROOT)} {b.keys['id']}" in script, b.name


SH = [b for b in BLOCKS if kind(b) == "sh"]


@pytest.mark.parametrize("block", SH, ids=[b.name for b in SH])
def test_sh_block(block, tmp_path):
    box = sandbox(tmp_path)
    code = block.code
    if "ci" in block.keys:
        # CI runs these scripts (.ci/run): the block must name them as .ci/run does; the rest
        # of each line runs here.
        ci = ci_text()
        for script in re.findall(r"bash (scripts/\w+\.sh)", code):
            assert f"bash {script}" in ci, f"{block.name}: .ci/run does not run {script}"
        code = re.sub(r"bash scripts/(setup|test)\.sh( && )?", "", code)
    if "quick" in block.keys:
        code = db.apply_stand_ins(code)
    else:
        assert not any(re.search(p, l) for l in code.splitlines() for p, _ in db.STAND_INS[:3]), \
            f"{block.name}: a long command without the `quick` marker"
    out = run_bash(code, box, {"HOME": str(tmp_path / "home")})
    want = expected_output(block)
    if want is not None:
        assert out == want, f"{block.name}: printed\n{out}\nthe doc shows\n{want}"


CHECKED = [b for b in BLOCKS if kind(b) == "check"]


@pytest.mark.parametrize("block", CHECKED, ids=[b.name for b in CHECKED])
def test_checked_block(block, tmp_path):
    CHECKS[block.keys.get("output-of") or block.keys.get("checked-by")](block, tmp_path)


# ---- the named checks ----------------------------------------------------------------------


def numbers(text):
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


@check("moe-train")
def _summary(block, tmp_path):
    """README: the summary of `moe train` (the default run, 3000 steps: ~10 s). The words
    and the configuration numbers as printed; the measured numbers within 20% (the digits
    hold for one build on one CPU: README, "Determinism")."""
    out = subprocess.run([str(MOE), "train", "--no-plots", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    got = [l.rstrip() for l in out[out.index("summary"):].splitlines()]
    want = block.code.rstrip("\n").splitlines()
    got = got[:len(want)]
    assert [re.sub(r"[\d.]+", "#", l) for l in got] == [re.sub(r"[\d.]+", "#", l) for l in want]
    for g, w in zip(got, want):
        gn, wn = numbers(g), numbers(w)
        if w.split()[0] in ("model", "routing", "parameters", "steps", "expert"):
            if w.split()[0] == "expert":  # the shares: each within 3 points, summing to 100
                assert all(abs(a - b) <= 3 for a, b in zip(gn, wn)) and abs(sum(gn) - 100) < 1
                continue
            assert gn == wn, (g, w)
        else:
            for a, b in zip(gn, wn):
                assert abs(a - b) <= 0.2 * max(abs(b), 0.01), (g, w)


@check("safetensors-layout")
def _layout(block, tmp_path):
    """docs/checkpoints.md: the byte layout and the header of a checkpoint moe.MoE writes
    (the header's example: d_model 64, 8 mlp experts of d_ff 256, no noise: W_g, then W1)."""
    import moe
    layer = moe.MoE(64, 8, 2, d_ff=256, noise="none")
    path = tmp_path / "m.safetensors"
    layer.save(str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode("utf-8")
    assert (8 + n) % 8 == 0 and header.rstrip(" ") == header.rstrip()
    h = json.loads(header)
    if block.lang == "json":
        shown = json.loads(block.code.replace(", ...}", "}"))
        assert set(shown["__metadata__"]) <= set(h["__metadata__"]) | {"optim"}
        for name, entry in shown.items():
            if name != "__metadata__":
                assert h[name] == entry, (name, h[name], entry)
    else:
        assert "8 + N is a multiple of 8" in block.code
        end = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        assert len(raw) == 8 + n + end


@check("tiny-lm")
def _tiny_lm(block, tmp_path):
    """docs/pytorch.md: the output of the language-model example. Its losses and loads are
    this CPU's bits; another CPU routes some tokens differently: the loss falls as shown
    (each within 25%), five lines, two layers of four experts whose loads sum to
    2 x 16 x 24 tokens."""
    import test_torch_train as ttt
    import contextlib
    import io
    ns = ttt.docs_example()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ns["train"]()
    got, want = buf.getvalue().splitlines(), block.code.rstrip("\n").splitlines()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.split()[:2] == w.split()[:2]
        gl, wl = float(g.split()[3]), float(w.split()[3])
        assert abs(gl - wl) <= 0.25 * wl, (g, w)
        loads = json.loads(g.split("layer ", 1)[1])
        assert [sum(l) for l in loads] == [2 * 16 * 24] * 2


@check("cpp-program")
def _cpp_chain(block, tmp_path):
    """README: the C++ program, the install command and the CMake lines, together: install
    the build into $HOME/.local (HOME a temporary folder), build my_app from the two
    fences against it, run it."""
    readme = [b for b in BLOCKS if b.path.name == "README.md"]
    install = next(b for b in readme if b.keys.get("id") == "cmake-install")
    lines = next(b for b in readme if b.keys.get("id") == "cmake-lines")
    home = tmp_path / "home"
    box = sandbox(tmp_path)
    run_bash(install.code, box, {"HOME": str(home)})
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.cpp").write_text(block.code)
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.25)\nproject(my_app LANGUAGES CXX)\n"
        "add_executable(my_app main.cpp)\ntarget_compile_features(my_app PRIVATE cxx_std_20)\n"
        + lines.code)
    run_bash(f'cmake -S "{app}" -B "{app}/build" -DCMAKE_BUILD_TYPE=Release '
             f'-DCMAKE_PREFIX_PATH="$HOME/.local" >/dev/null && '
             f'cmake --build "{app}/build" >/dev/null', app, {"HOME": str(home)})
    out = run_bash(f'"{app}/build/my_app"', app, {"HOME": str(home)})
    assert out.strip(), "my_app printed nothing"


@check("lines-of")
def _lines_of(block, tmp_path):
    """A fence that is part of another block's check (cmake-install, cmake-lines): the
    README's C++ chain runs it."""
    assert block.keys.get("id") in ("cmake-install", "cmake-lines"), block.name
