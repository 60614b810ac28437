#!/usr/bin/env bash
# The CMake package as another project sees it: installs the build tree BUILD into a fresh
# prefix, configures and builds examples/cmake_consumer against that prefix alone
# (find_package(libmoe CONFIG REQUIRED), moe::moe), and runs it. Passes when the consumer
# links the installed libmoe.so, prints the worked example's numbers and says "ok", and the
# same holds for moe::moe_static (and moe::dist links, when built with MPI).
# Usage: tests/package/cmake_consumer.sh BUILD SOURCE
set -euo pipefail
build=$(realpath "$1")
src=$(realpath "$2")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log"
for f in include/moe/moe.hpp lib/libmoe.so lib/libmoe.a lib/cmake/libmoe/libmoeConfig.cmake \
         lib/cmake/libmoe/libmoeConfigVersion.cmake bin/moe; do
  [ -e "$tmp/prefix/$f" ] || { echo "not installed: $f" >&2; exit 1; }
done
# The installed moe carries what it runs: moe train's plots come from the prefix's
# share/libmoe, not from the source tree (issue 22). The interpreter is named (MOE_PYTHON: the
# project environment, which has matplotlib); the script is the installed one.
[ -f "$tmp/prefix/share/libmoe/plot_run.py" ] || { echo "not installed: share/libmoe/plot_run.py" >&2; exit 1; }
if [ -x "$src/.venv/bin/python" ]; then
  (cd "$tmp" && env -u MOE_PLOT_SCRIPT MOE_PYTHON="$src/.venv/bin/python" \
     "$tmp/prefix/bin/moe" train --steps 40 --eval-tokens 256 --out "$tmp/run" >"$tmp/train.log" 2>&1) ||
    { cat "$tmp/train.log" >&2; echo "installed moe train failed" >&2; exit 1; }
  grep -q "written by $tmp/prefix/share/libmoe/plot_run.py" "$tmp/train.log" ||
    { cat "$tmp/train.log" >&2; echo "installed moe train: plots not made by the installed script" >&2; exit 1; }
  for f in loss.png experts.png specialisation.png; do
    [ -s "$tmp/run/$f" ] || { echo "installed moe train wrote no $f" >&2; exit 1; }
  done
  echo "installed moe train: plots by the prefix's share/libmoe/plot_run.py"
fi
# Nothing internal is installed: the headers under src/ stay in the tree.
if find "$tmp/prefix/include" -name '*.hpp' | grep -v '/include/moe/'; then
  echo "headers outside include/moe were installed" >&2
  exit 1
fi

cmake -S "$src/examples/cmake_consumer" -B "$tmp/consumer" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/configure.log" ||
  { cat "$tmp/configure.log" >&2; exit 1; }
grep -qF "libmoe_DIR:PATH=$tmp/prefix/lib/cmake/libmoe" "$tmp/consumer/CMakeCache.txt" ||
  { echo "find_package(libmoe) did not find the installed package" >&2; exit 1; }
cmake --build "$tmp/consumer" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log" >&2; exit 1; }

# The executable resolves libmoe.so from the installed prefix, not from the build tree.
ldd "$tmp/consumer/moe_consumer" | grep -F "$tmp/prefix/lib/libmoe.so" >/dev/null ||
  { echo "moe_consumer does not load the installed libmoe.so:" >&2; ldd "$tmp/consumer/moe_consumer" >&2; exit 1; }
out=$("$tmp/consumer/moe_consumer")
echo "$out"
expected="experts 0 1, weights 0.550 0.450
y 0.710 0.690
load 1 1 0
ok"
[ "$out" = "$expected" ] || { echo "unexpected output; expected:" >&2; echo "$expected" >&2; exit 1; }

# The other exported targets: moe::moe_static (oneDNN and OpenMP must come along as link
# dependencies) runs the same program; moe::dist, when the package has it, compiles and links
# against libmoe_dist.so (running it would need mpirun).
mkdir "$tmp/more"
cat >"$tmp/more/dist.cpp" <<'CPP'
#include <cstdio>

#include "moe/dist.hpp"

// Never run: the constructor is collective over MPI. The call makes the link need it.
int main(int argc, char**) {
  if (argc > 99) {
    moe::MoEConfig cfg;
    moe::dist::ExpertParallelMoE layer(cfg, MPI_COMM_WORLD);
    std::printf("%d\n", layer.rank());
  }
  return 0;
}
CPP
cat >"$tmp/more/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(moe_consumer_more LANGUAGES CXX)
find_package(libmoe CONFIG REQUIRED)
add_executable(static_consumer "$src/examples/cmake_consumer/main.cpp")
target_compile_features(static_consumer PRIVATE cxx_std_20)
target_link_libraries(static_consumer PRIVATE moe::moe_static)
if(TARGET moe::dist)
  add_executable(dist_consumer dist.cpp)
  target_compile_features(dist_consumer PRIVATE cxx_std_20)
  target_link_libraries(dist_consumer PRIVATE moe::dist)
endif()
CMAKE
cmake -S "$tmp/more" -B "$tmp/more/build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/configure-more.log" ||
  { cat "$tmp/configure-more.log" >&2; exit 1; }
cmake --build "$tmp/more/build" >"$tmp/build-more.log" 2>&1 ||
  { cat "$tmp/build-more.log" >&2; exit 1; }
if ldd "$tmp/more/build/static_consumer" | grep -q 'libmoe\.so'; then
  echo "static_consumer loads libmoe.so; moe::moe_static should link libmoe.a" >&2
  exit 1
fi
[ "$("$tmp/more/build/static_consumer")" = "$expected" ] ||
  { echo "static_consumer: unexpected output" >&2; exit 1; }
echo "moe::moe_static: same output"
if [ -e "$tmp/prefix/lib/libmoe_dist.so" ]; then
  [ -x "$tmp/more/build/dist_consumer" ] || { echo "moe::dist is missing" >&2; exit 1; }
  ldd "$tmp/more/build/dist_consumer" | grep -F "$tmp/prefix/lib/libmoe_dist.so" >/dev/null ||
    { echo "dist_consumer does not load the installed libmoe_dist.so" >&2; exit 1; }
  echo "moe::dist: links libmoe_dist.so"
fi
