#!/usr/bin/env bash
# `pip install .` as a user would do it, checked end to end: builds a wheel of the repository
# (scikit-build-core from PyPI in a temporary build environment, the project's CMake without
# tests, benchmarks or fuzzers), installs it into a fresh virtual environment (numpy from
# PyPI), and there imports moe, runs a forward (tests/package/wheel_smoke.py) and `moe --help`.
# Needs Debian's python3-venv, the packages scripts/setup.sh installs and PyPI. Most of the
# time is compiling the library: 3 minutes of CPU, 6 minutes of wall time on a busy 2-core
# machine. Usage: tests/package/wheel.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The wheel is built from a copy of the source tree (the files git tracks or would track),
# which is deleted before the installed package runs: what is installed must carry what it
# runs (issue 22: moe train ran its plots through the clone's scripts/plot_run.py).
src="$tmp/src"
mkdir "$src"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  (cd "$repo" && xargs -0 tar cf - --no-recursion 2>/dev/null) | tar xf - -C "$src"
cp "$repo/python/constraints.txt" "$tmp/constraints.txt"
python="${PYTHON:-/usr/bin/python3}"  # the interpreter the environments are made from
pip_q=(--quiet --disable-pip-version-check --no-input)
start=$SECONDS

"$python" -m venv "$tmp/build-env"
# Pinned so that a new release elsewhere cannot change what this test builds with;
# pyproject.toml itself asks only for scikit-build-core >= 0.10 and pybind11 >= 2.12.
"$tmp/build-env/bin/pip" install "${pip_q[@]}" scikit-build-core==1.1.2 pybind11==3.1.0
defines=()
if command -v ccache >/dev/null; then
  defines+=(--config-settings=cmake.define.CMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
# The build tree is kept (build-dir) so that its compile commands can be read below.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$tmp/build-env/bin/pip" wheel "${pip_q[@]}" --no-deps --no-build-isolation \
  "${defines[@]}" --config-settings=build-dir="$tmp/wheel-build" -w "$tmp/dist" "$src" \
  >"$tmp/wheel.log" 2>&1 ||
  { tail -n 60 "$tmp/wheel.log" >&2; echo "wheel: pip wheel failed" >&2; exit 1; }
# One build for every CPU (docs/design.md, "The CPU and the matrix engine"): the wheel's code
# is compiled for the baseline, never for the build machine.
commands="$tmp/wheel-build/compile_commands.json"
[ -s "$commands" ] || { echo "wheel: no compile commands in $tmp/wheel-build" >&2; exit 1; }
if grep -q -- '-march=native' "$commands"; then
  echo "wheel: built with -march=native" >&2
  exit 1
fi
grep -q -- '-march=x86-64-v3' "$commands" ||
  { echo "wheel: not built for the x86-64-v3 baseline" >&2; exit 1; }
built=$SECONDS
wheel=$(ls "$tmp"/dist/libmoe-*.whl)
# The wheel holds the package and the command, nothing of the C++ development files.
"$python" -m zipfile -l "$wheel" >"$tmp/contents"
for f in moe/__init__.py moe/_moe "/scripts/moe" "/data/share/libmoe/plot_run.py"; do
  grep -q "$f" "$tmp/contents" || { echo "wheel: $f is missing from $wheel" >&2; exit 1; }
done
if grep -E 'include/|\.a$|cmake/' "$tmp/contents"; then
  echo "wheel: C++ development files in the wheel" >&2
  exit 1
fi

"$python" -m venv "$tmp/venv"
# The README's block "pip install ." (README.md, id pip-install) runs as written in the fresh
# environment, from the source copy; `pip install .` stands for installing the wheel just
# built from that same tree (with its plots extra: matplotlib), so the library is compiled
# once.
block=$(python3 "$repo/tests/docs/doc_blocks.py" extract README.md pip-install)
(cd "$src" && env -u PYTHONPATH PATH="$tmp/venv/bin:$PATH" WHEEL="$wheel" \
   CONSTRAINTS="$tmp/constraints.txt" bash -euo pipefail -c '
     pip() {
       if [ "$*" = "install ." ]; then
         command pip install --quiet --disable-pip-version-check "${WHEEL}[plots]" -c "$CONSTRAINTS"
       else command pip "$@"; fi
     }
     '"$block") >"$tmp/readme-block.log" 2>&1 ||
  { cat "$tmp/readme-block.log" >&2; echo "wheel: the README's pip install block failed" >&2; exit 1; }
rm -rf "$src"
# moe train from the installed wheel, the source copy gone: the plots come from the
# environment's share/libmoe and its python3 (matplotlib from the plots extra).
(cd "$tmp" && env -u PYTHONPATH -u MOE_PYTHON -u MOE_PLOT_SCRIPT PATH="$tmp/venv/bin:$PATH" \
   moe train --steps 40 --eval-tokens 256 --out "$tmp/run" >"$tmp/train.log" 2>&1) ||
  { cat "$tmp/train.log" >&2; echo "wheel: moe train failed" >&2; exit 1; }
for f in loss.png experts.png specialisation.png summary.json; do
  [ -s "$tmp/run/$f" ] || { cat "$tmp/train.log" >&2; echo "wheel: moe train wrote no $f" >&2; exit 1; }
done
grep -q "written by $tmp/venv/share/libmoe/plot_run.py" "$tmp/train.log" ||
  { cat "$tmp/train.log" >&2; echo "wheel: the plots did not come from the installed script" >&2; exit 1; }
# Away from the repository, with no PYTHONPATH: only the installed package can be imported.
(cd "$tmp" && env -u PYTHONPATH "$tmp/venv/bin/python" "$repo/tests/package/wheel_smoke.py")
# The same on the lowest kernel level, as on an AVX2-only CPU (MOE_MAX_ISA, src/common/cpu.hpp).
(cd "$tmp" && env -u PYTHONPATH MOE_MAX_ISA=avx2 "$tmp/venv/bin/python" \
   "$repo/tests/package/wheel_smoke.py" avx2)
found=$(PATH="$tmp/venv/bin:$PATH" command -v moe)
[ "$found" = "$tmp/venv/bin/moe" ] || { echo "wheel: moe resolves to $found" >&2; exit 1; }
help=$(env -u PYTHONPATH PATH="$tmp/venv/bin:$PATH" moe --help)
for sub in train bench gate route; do
  grep -q "$sub" <<<"$help" || { echo "wheel: 'moe --help' does not list $sub" >&2; exit 1; }
done
# With torch: the project environment's interpreter, the installed files alone on the path for
# moe (pip install --target, away from the repository): import moe.torch and the README's
# PyTorch example.
if [ -x "$repo/.venv/bin/python" ]; then
  "$tmp/venv/bin/pip" install "${pip_q[@]}" --no-deps --target "$tmp/site" "$wheel"
  (cd "$tmp" && env -u PYTHONPATH PYTHONPATH="$tmp/site" "$repo/.venv/bin/python" \
     "$repo/tests/package/wheel_torch.py" "$tmp/site" "$repo/README.md")
fi
echo "wheel: $(basename "$wheel") built in $((built - start))s, installed and checked in $((SECONDS - built))s"
