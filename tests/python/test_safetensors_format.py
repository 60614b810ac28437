"""Our safetensors files against an independent reader and writer: json + numpy.

numpy writes a file the way other tools do (sorted keys, spaces in the JSON, data in a
different order from the header, F64/F16/BF16 besides F32); the C++ test binary reads it and
writes it back with libmoe's writer; json + np.frombuffer then check every byte of the
format: the little-endian header length, the 8-byte padding, the dtypes, shapes, contiguous
offsets and values.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "build" / "bin" / "moe_tests"

pytestmark = pytest.mark.skipif(not TESTS.exists(), reason="build/bin/moe_tests not built")


def write_foreign(path, tensors, metadata):
    """A safetensors writer independent of libmoe's."""
    header, chunks, offset = {}, [], 0
    # Data in reverse name order, header keys sorted: the two orders differ on purpose.
    for name in sorted(tensors, reverse=True):
        arr, dtype = tensors[name]
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    text = json.dumps(header, sort_keys=True, indent=1).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read_ours(path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0, "header not padded to a multiple of 8"
    text = blob[8:8 + n]
    assert text.rstrip(b" ") == text.rstrip(), "padding must be spaces"
    header = json.loads(text.decode("utf-8"))
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    out, end = {}, 0
    for name, info in header.items():  # our writer keeps data in header order
        assert set(info) == {"dtype", "shape", "data_offsets"}
        assert info["dtype"] == "F32"
        b, e = info["data_offsets"]
        assert b == end, f"{name}: data not contiguous"
        end = e
        out[name] = np.frombuffer(data[b:e], dtype="<f4").reshape(info["shape"])
    assert end == len(data), "data section has bytes no tensor owns"
    return out, meta, list(header)


def copy_through_cpp(src, dst):
    env = dict(os.environ, MOE_SAFETENSORS_COPY_IN=str(src), MOE_SAFETENSORS_COPY_OUT=str(dst))
    r = subprocess.run([str(TESTS), "--gtest_filter=SafetensorsInterop.CopyFileGivenByEnvironment"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[  PASSED  ] 1 test" in r.stdout


def test_numpy_reads_what_libmoe_writes(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype("<f4")
    f32[0, :3] = [-0.0, np.inf, np.float32(1e-45)]
    f64 = rng.standard_normal(5)
    f16 = np.array([1.0, -2.5, 65504.0, 6e-8], dtype="<f2")
    bf16_src = np.array([1.0, -0.5, 3.140625], dtype="<f4")
    bf16 = (bf16_src.view("<u4") >> 16).astype("<u2")
    tensors = {
        "w.f32": (f32, "F32"),
        "w.f64": (f64.astype("<f8"), "F64"),
        "w.f16": (f16, "F16"),
        "w.bf16": (bf16, "BF16"),
        "scalar": (np.array(2.5, dtype="<f4"), "F32"),
        "empty": (np.zeros((2, 0, 3), dtype="<f4"), "F32"),
    }
    metadata = {"moe_config": json.dumps({"d_model": 4}), "µ": "ü → 😀", "quote": "\"\\"}
    src, dst = tmp_path / "foreign.safetensors", tmp_path / "ours.safetensors"
    write_foreign(src, tensors, metadata)
    copy_through_cpp(src, dst)

    got, meta, order = read_ours(dst)
    assert meta == metadata
    assert order == sorted(tensors)  # the C++ side kept the header order it read
    np.testing.assert_array_equal(got["w.f32"].view("<u4"), f32.view("<u4"))  # bit for bit
    np.testing.assert_array_equal(got["w.f64"], f64.astype(np.float32))
    np.testing.assert_array_equal(got["w.f16"], f16.astype(np.float32))
    np.testing.assert_array_equal(got["w.bf16"], bf16_src)
    assert got["scalar"].shape == () and got["scalar"] == np.float32(2.5)
    assert got["empty"].shape == (2, 0, 3)


def test_cpp_refuses_a_foreign_file_with_overlapping_tensors(tmp_path):
    a = np.arange(4, dtype="<f4")
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    text = json.dumps(header).encode()
    src = tmp_path / "bad.safetensors"
    src.write_bytes(struct.pack("<Q", len(text)) + text + a.tobytes())
    env = dict(os.environ, MOE_SAFETENSORS_COPY_IN=str(src),
               MOE_SAFETENSORS_COPY_OUT=str(tmp_path / "out.safetensors"))
    r = subprocess.run([str(TESTS), "--gtest_filter=SafetensorsInterop.CopyFileGivenByEnvironment"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "overlap" in r.stdout
    assert not (tmp_path / "out.safetensors").exists()
