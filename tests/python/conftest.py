"""pytest setup for libmoe's Python tests.

The package is built into build/python/moe. Run with PYTHONPATH=build/python under the
project environment's interpreter, .venv/bin/python (scripts/test.sh does); when `moe`
is not importable otherwise, this file adds the build folder of the checkout itself (or
$MOE_BUILD_DIR).
"""
import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]
if importlib.util.find_spec("moe") is None:
    _build = pathlib.Path(os.environ.get("MOE_BUILD_DIR", _ROOT / "build"))
    sys.path.insert(0, str(_build / "python"))
# torch_ref.py sits beside the tests.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    seed = sum(map(ord, request.node.name)) * 7919
    return np.random.default_rng(seed)


@pytest.fixture
def threads():
    """Restores libmoe's thread count after a test that changes it."""
    import moe

    n = moe.get_num_threads()
    yield
    moe.set_num_threads(n)
