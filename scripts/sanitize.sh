#!/usr/bin/env bash
# The whole C++ test suite under AddressSanitizer + UndefinedBehaviorSanitizer (CMake preset
# "debug": build-debug/, MOE_SANITIZE=ON), then the CLI's pytest suites against the
# sanitized `moe` binary. Any sanitizer report fails the run (halt_on_error).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
cmake --preset debug >/dev/null || exit 1
cmake --build --preset debug -j"$(nproc)" || exit 1
built=$SECONDS

# allocator_may_return_null: a failed huge allocation throws std::bad_alloc as in a release
# build (the library turns it into moe::Error) instead of ASan aborting the process.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:allocator_may_return_null=1:strict_string_checks=1:check_initialization_order=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export LSAN_OPTIONS="suppressions=$PWD/scripts/sanitize/lsan.supp:print_suppressions=0"
export OMP_NUM_THREADS=2
status=0
ctest --test-dir build-debug --output-on-failure -j2 -E '^mpi\.' || status=1
# The MPI drivers run with ASan and UBSan as everything else, but with leak detection off:
# Open MPI's dlopen'ed transport components keep allocations (argv copies, op tables) that
# are never freed and are unloaded before LeakSanitizer looks, so their frames cannot be
# named in a suppression ("<unknown module>"). Everything but src/dist/ is leak-checked by
# the single-process run above; src/dist/ keeps its buffers in std::vector and RAII types.
ASAN_OPTIONS="${ASAN_OPTIONS/detect_leaks=1/detect_leaks=0}" \
  ctest --test-dir build-debug --output-on-failure -j2 -R '^mpi\.' || status=1
if [ -d build/python/moe ]; then
  # The Python module comes from the release tree; the CLI under test is the sanitized one.
  MOE_BIN="$PWD/build-debug/bin/moe" PYTHONPATH="$PWD/build/python" \
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/python/test_cli.py \
    tests/python/test_errors.py -k "cli or test_C" || status=1
fi
echo "sanitize: build $((built - start))s, tests $((SECONDS - built))s, status $status"
exit $status
