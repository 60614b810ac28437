#!/usr/bin/env bash
# Sets libmoe up on a fresh Debian 12 machine (as root): installs the Debian packages that
# are missing, then configures and builds the release tree in build/.
# MOE_PRESET picks the CMake preset (default: release; CI uses ci, which adds -Werror).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake pkg-config git
  libdnnl-dev nlohmann-json3-dev libcli11-dev
  googletest libgtest-dev libbenchmark-dev
  pybind11-dev python3-dev python3-pybind11 python3-numpy python3-pytest python3-matplotlib python3-torch
  python3-venv  # tests/package/wheel.sh: `pip install .` into fresh virtual environments
  openmpi-bin libopenmpi-dev
  libopenblas0-pthread  # the BLAS behind NumPy/PyTorch: Debian's torch falls back to the reference BLAS (3 GFLOP/s) without it
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

preset="${MOE_PRESET:-release}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j"$(nproc)"
