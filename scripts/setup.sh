#!/usr/bin/env bash
# Sets libmoe up on a fresh Debian 12 machine (as root): installs the Debian packages that
# are missing, makes the Python environment .venv/ (Debian's python3 with the pinned PyPI
# packages of python/requirements.txt), then configures and builds the release tree in build/.
# MOE_PRESET picks the CMake preset (default: release; CI uses ci, which adds -Werror).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake pkg-config git
  libdnnl-dev nlohmann-json3-dev libcli11-dev
  googletest libgtest-dev libbenchmark-dev
  python3-dev python3-venv  # the extension is built for Debian's python3 (3.11); pybind11 comes from .venv/; tests/package/wheel.sh makes fresh venvs
  openmpi-bin libopenmpi-dev
  clang libclang-rt-14-dev libomp-14-dev  # scripts/fuzz.sh: libFuzzer, ASan/UBSan runtimes
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages and not root; run as root or install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Python environment: .venv/ on Debian's interpreter (the one the extension is built
# for; not whatever python3 is first on PATH), with the exact versions of
# python/requirements.txt (torch, transformers, NumPy, pytest, ...). Skipped when they are
# all installed already; PyTorch's wheel brings about 3 GB of CUDA libraries (about 3 min).
venv=.venv
if ! "$venv/bin/python" scripts/check_requirements.py python/requirements.txt 2>/dev/null; then
  echo "setup: installing the Python packages of python/requirements.txt into $venv/" >&2
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r python/requirements.txt
  "$venv/bin/python" scripts/check_requirements.py python/requirements.txt
fi

preset="${MOE_PRESET:-release}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j"$(nproc)"
