#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (build-fuzz/, MOE_FUZZ=ON: coverage, ASan,
# UBSan) and runs each for FUZZ_SECONDS seconds (default 60) from its seed corpus
# fuzz/corpus/<target>/. New inputs go to build-fuzz/corpus/<target>/ (the repo's seeds are
# only read); a crashing input is saved as build-fuzz/artifacts/<target>/crash-* and makes the
# script exit 1. Usage: scripts/fuzz.sh [target...]   (default: every target built)
set -uo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
build=build-fuzz

CXX="${FUZZ_CXX:-clang++}" cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOE_FUZZ=ON -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_BENCH=OFF -DMOE_BUILD_PYTHON=OFF >/dev/null ||
  exit 1
targets=("$@")
if ((${#targets[@]} == 0)); then
  for src in fuzz/fuzz_*.cpp; do
    t=$(basename "$src" .cpp)
    # fuzz/CMakeLists.txt leaves out targets whose code is not there yet.
    grep -q "moe_fuzz_target($t " fuzz/CMakeLists.txt && targets+=("$t")
  done
fi
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" >/dev/null || exit 1

status=0
for t in "${targets[@]}"; do
  [ -x "$build/fuzz/$t" ] || { echo "fuzz: $t was not built" >&2; status=1; continue; }
  name=${t#fuzz_}
  mkdir -p "$build/corpus/$name" "$build/artifacts/$name"
  log="$build/$t.log"
  # One OpenMP thread: inputs run one at a time. Leak checking stays on.
  OMP_NUM_THREADS=1 "$build/fuzz/$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
    -max_len=16384 -dict=fuzz/json.dict -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/$name/" "$build/corpus/$name" "fuzz/corpus/$name" \
    >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if ((rc != 0)); then
    status=1
    echo "fuzz: $t FAILED after ${runs:-?} runs (exit $rc); see $log:" >&2
    grep -E "ERROR|SUMMARY|Test unit written" "$log" | head -5 >&2
  else
    echo "fuzz: $t ok, ${runs:-?} runs in ${seconds}s"
  fi
done
exit $status
