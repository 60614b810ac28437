#!/usr/bin/env bash
# Runs the whole test suite against the tree that scripts/setup.sh built: the C++ suite
# under ctest (with the installed CMake package's consumer), the Python suite and the
# examples of README.md and docs/ (tests/docs) under the project's environment .venv/
# (Debian's python3 with the pinned packages of python/requirements.txt), then `pip install .` end to end (tests/package/wheel.sh: a few
# minutes; MOE_TEST_WHEEL=0 leaves it out while iterating).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
status=0
ctest --test-dir build --output-on-failure -j2 || status=1
PYTHONPATH="$PWD/build/python" .venv/bin/python -m pytest -q tests/python || status=1
# Every fenced example of README.md and docs/ (tests/docs/doc_blocks.py says how each runs):
# the Python ones under pytest-codeblocks, the shell ones and the outputs by test_doc_blocks.py,
# with moe train --help's lists (a few minutes, most of it moe train and moe bench --quick).
PYTHONPATH="$PWD/build/python:$PWD/tests/docs:$PWD/tests/python" .venv/bin/python -m pytest -q \
  -p doc_plugin --codeblocks README.md docs tests/docs || status=1
if [ "${MOE_TEST_WHEEL:-1}" != 0 ]; then
  bash tests/package/wheel.sh || status=1
fi
exit $status
