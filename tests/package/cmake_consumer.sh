#!/usr/bin/env bash
# The CMake package as another project sees it: installs the build tree BUILD into a fresh
# prefix, configures and builds examples/cmake_consumer against that prefix alone
# (find_package(libmoe CONFIG REQUIRED), moe::moe), and runs it. Passes when the consumer
# links the installed libmoe.so, prints the worked example's numbers and says "ok".
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
