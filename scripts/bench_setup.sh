#!/usr/bin/env bash
# Makes the environments that `moe bench`'s peers need beyond the project's own .venv/:
# .venv-kt/, Debian's python3 with KTransformers' kernels (PyPI kt-kernel, the exact version of
# bench/peers/kt_requirements.txt), which pins torch 2.9.1 and so cannot live in .venv/ (torch
# 2.15). Not part of the Quick start (scripts/setup.sh): only the benchmark uses it, and a
# `moe bench` without it prints "skipped: <reason>" in the kt-kernel column.
#
#   scripts/bench_setup.sh            # make or update .venv-kt/ (about 3 GB: torch's wheel)
#   MOE_KT_VENV=/path scripts/bench_setup.sh   # somewhere else; moe bench reads the same variable
#
# Then `moe bench --config real-models` (and --model) runs bench/peers/kt_peer.py under
# .venv-kt/bin/python. Skipped, without an error, when the pinned packages are installed already.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${MOE_KT_VENV:-.venv-kt}"
req=bench/peers/kt_requirements.txt
python=/usr/bin/python3

if [ -x "$venv/bin/python" ] && "$venv/bin/python" scripts/check_requirements.py "$req" 2>/dev/null; then
  echo "bench_setup: $venv already has the packages of $req" >&2
else
  echo "bench_setup: installing the packages of $req into $venv/" >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  # The folder ignores itself, so that the checkout's .gitignore needs no entry for it.
  [ -e "$venv/.gitignore" ] || echo '*' > "$venv/.gitignore"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  "$venv/bin/python" scripts/check_requirements.py "$req"
fi

# What the peer will find: the kernel variant kt-kernel loaded for this CPU, and whether its
# bf16 and int8 MoE classes are there. Printed, never fatal: a CPU without a usable variant is
# a benchmark row that says so, not a failed setup.
"$venv/bin/python" bench/peers/kt_peer.py --probe || true
