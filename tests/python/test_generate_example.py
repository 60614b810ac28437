"""examples/generate.py, greedy generation with transformers' MoE blocks and with libmoe's: run
through its main() at tiny sizes (--tiny: the family's structure, d 64, 8–16 experts, vocab
512; one layer, 16 prompt tokens, 4 new) for both models. The rows are printed, bf16 gives
transformers' tokens here (seed 0; not in general: transformers' bf16 blocks round more
often than libmoe's, and a greedy choice between logits one bf16 step apart can go either
way, as the script's docstring says), a precision the library refuses is a "skipped" row and
not a crash, the bytes a decoded token reads are accounted as the docstring says, and
--check-tokens turns a bf16 difference into exit status 1. No timing is checked."""
import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "generate.py"
MODELS = ("qwen3", "gpt-oss")
TINY = ["--tiny", "--layers", "1", "--prompt", "16", "--new-tokens", "4", "--read-gbs", "10"]
REFUSED = "int3"  # a precision name no version of the library accepts


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generate_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(gen, capsys, threads):
    """main(argv) → (exit status, stdout); torch's thread count and transformers' logging
    verbosity (main sets both) restored after."""
    n = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()

    def go(*argv):
        status = gen.main([*TINY, *argv])
        return status, capsys.readouterr().out

    yield go
    torch.set_num_threads(n)
    transformers.logging.set_verbosity(verbosity)


def json_rows(out):
    return {r["variant"]: r for r in map(json.loads, out.splitlines())}


@pytest.mark.parametrize("model", MODELS)
def test_table_rows(run, model):
    status, out = run("--model", model, "--precisions", f"bf16,{REFUSED}")
    assert status == 0
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["transformers"].endswith("reference")
    assert rows["libmoe bf16"].endswith("same")
    skipped = rows[f"libmoe {REFUSED}"]
    assert "skipped: " in skipped and f"'{REFUSED}'" in skipped, skipped


@pytest.mark.parametrize("model", MODELS)
def test_json_rows(gen, run, model):
    status, out = run("--model", model, "--precisions", f"bf16,int8,{REFUSED}", "--json",
                      "--check-tokens")
    assert status == 0
    rows = json_rows(out)
    assert list(rows) == ["transformers", "libmoe bf16", "libmoe int8", f"libmoe {REFUSED}"]
    ref, bf16 = rows["transformers"], rows["libmoe bf16"]
    assert len(ref["tokens"]) == 4
    assert bf16["tokens"] == ref["tokens"] and bf16["tokens_equal"]
    assert bf16["held_precision"] == "bf16" and rows["libmoe int8"]["held_precision"] == "int8"
    for r in (ref, bf16, rows["libmoe int8"]):
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0
        assert 0 < r["moe_share_prefill"] <= 1 and 0 < r["moe_share_decode"] <= 1
        assert r["moe_ms_per_token"] > 0 and r["runs"] == 1
        assert r["bound_tok_s"] == pytest.approx(10e9 / r["bytes_per_token"])
    assert "skipped" in rows[f"libmoe {REFUSED}"]
    assert rows["libmoe int8"]["bytes_per_token"] < ref["bytes_per_token"]

    # The accounting, by hand: every parameter but the embedding's other rows and the
    # experts not chosen; libmoe holds the router and the expert biases in fp32 (4 bytes,
    # not bf16's 2).
    args = gen.parse_args(["--model", model, *TINY])
    m = gen.build_model(args)
    c = m.config
    E, k, d = c.num_experts, c.num_experts_per_tok, c.hidden_size
    experts = m.model.layers[0].mlp.experts
    expert_bytes = sum(p.numel() for p in experts.parameters()) * 2
    total = sum(p.numel() for p in m.parameters()) * 2
    expect = total - (c.vocab_size - 1) * d * 2 - (E - k) / E * expert_bytes
    assert ref["bytes_per_token"] == pytest.approx(expect)
    router = E * d + (E if model == "gpt-oss" else 0)
    biases = k * (2 * c.intermediate_size + d) if model == "gpt-oss" else 0
    assert bf16["bytes_per_token"] - ref["bytes_per_token"] == pytest.approx(2 * (router + biases))
    # int8: a byte a weight and 8 bytes a column (W1, W3: F columns; W2: d) for k experts
    F = c.moe_intermediate_size if model == "qwen3" else c.intermediate_size
    weights, columns = 3 * d * F, 2 * F + d
    assert (bf16["bytes_per_token"] - rows["libmoe int8"]["bytes_per_token"]
            == pytest.approx(k * (2 * weights - (weights + 8 * columns))))


def test_check_tokens_fails_on_a_bf16_difference(gen, run, monkeypatch):
    monkeypatch.setattr(gen, "first_difference", lambda a, b: 0 if a is not b else None)
    status, out = run("--model", "qwen3", "--precisions", "bf16", "--check-tokens")
    assert status == 1
    assert any(line.startswith("libmoe bf16") and "differ at 0 (gaps" in line
               for line in out.splitlines())
    status, _ = run("--model", "qwen3", "--precisions", "bf16")
    assert status == 0  # reported, not fatal, without --check-tokens


def test_token_difference_and_its_gaps(gen):
    ref, mine = [5, 1, 2], [5, 1, 3]
    ref_logits = [torch.zeros(4) for _ in ref]
    logits = [torch.zeros(4) for _ in mine]
    ref_logits[2][2], ref_logits[2][3] = 4.0, 4.0  # a tie transformers broke its way
    logits[2][3], logits[2][2] = 4.03125, 4.0  # one bf16 step at 4
    out = gen.compare_tokens(mine, logits, ref, ref_logits)
    assert out == {"tokens_equal": False, "first_difference": 2, "reference_gap": 0.0,
                   "variant_gap": 0.03125}
    assert gen.compare_tokens(ref, ref_logits, ref, ref_logits) == {
        "tokens_equal": True, "first_difference": None}
