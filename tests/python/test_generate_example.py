"""examples/generate.py, greedy generation with transformers' MoE blocks and with libmoe's: run
through its main() at tiny sizes (--tiny: the family's structure, d 64, 8–16 experts, vocab
512; one layer, 16 prompt tokens, 4 new) for both models. The rows are printed, bf16 gives
transformers' tokens here (seed 0; not in general: transformers' bf16 blocks round more
often than libmoe's, and a greedy choice between logits one bf16 step apart can go either
way, as the script's docstring says), int4 and the published format (fp8 for Qwen3, mxfp4
for GPT-OSS) are rows holding that precision, a precision the library refuses is a
"skipped" row and not a crash, the bytes a decoded token reads are accounted as the
docstring says, a token difference is reported with whether transformers' own choice was a
near-tie (and its routers' near-ties, counted by hooks checked on routers made to tie and
not to tie), the goals are computed from the rows and judged only where they apply, and
--check-tokens turns a bf16 difference into exit status 1. No timing is checked."""
import importlib.util
import json
import re
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
    """The rows of --json output by variant (the last line, {"goals": [...]}, left out)."""
    objs = [json.loads(line) for line in out.splitlines()]
    assert list(objs[-1]) == ["goals"]
    return {r["variant"]: r for r in objs[:-1]}


def json_goals(out):
    return json.loads(out.splitlines()[-1])["goals"]


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
    assert any(line.startswith("libmoe bf16 ") and "differ at 0 (near-tie: 0 bf16 steps)" in line
               for line in out.splitlines())
    assert "libmoe bf16: tokens NOT equal: they leave transformers' at new token 0 of 4." in out
    assert "a near-tie, below the resolution of its bf16 logits." in out
    # the hooked rerun of transformers counted its routers' choices up to token 0: the prompt's
    assert "of transformers' 16 top-k router choices" in out
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
                   "variant_gap": 0.03125, "reference_gap_steps": 0.0, "near_tie": True}
    assert gen.compare_tokens(ref, ref_logits, ref, ref_logits) == {
        "tokens_equal": True, "first_difference": None}
    ref_logits[2][2] = 4.03125  # one bf16 step above: still a near-tie
    out = gen.compare_tokens(mine, logits, ref, ref_logits)
    assert out["near_tie"] and out["reference_gap_steps"] == 1.0
    ref_logits[2][2] = 4.0625  # two steps: not a tie, and the verdict says so
    out = gen.compare_tokens(mine, logits, ref, ref_logits)
    assert not out["near_tie"] and out["reference_gap_steps"] == 2.0
    line = gen.tokens_verdict(dict(out, variant="libmoe bf16", precision="bf16"), 3)
    assert "tokens NOT equal" in line and "NOT a near-tie: bf16 rounding does not explain" in line
    line = gen.tokens_verdict(dict(out, variant="libmoe int4", precision="int4"), 3)
    assert "NOT a near-tie (int4 experts are a quantization" in line
    ties = dict(out, router_near_ties=2, router_choices=9)
    line = gen.tokens_verdict(dict(ties, variant="transformers, fp64 sums",
                                   precision=gen.FP64_SUMS), 3)
    assert "depend on the products' summation order" in line
    assert line.endswith("within one bf16 step.") and "libmoe rounds" not in line
    line = gen.tokens_verdict(dict(ties, variant="libmoe bf16", precision="bf16"), 3)
    assert "2 of transformers' 9 top-k router choices" in line and "libmoe rounds" in line
    # the step is the larger logit's: at -8 (|x| in [8, 16)) one step is 1/16
    ref_logits[2][2], ref_logits[2][3] = -8.0, -8.0625
    out = gen.compare_tokens(mine, logits, ref, ref_logits)
    assert out["near_tie"] and out["reference_gap_steps"] == 1.0


def test_bf16_step(gen):
    assert gen.bf16_step(1.0) == 2 ** -7 and gen.bf16_step(1.99) == 2 ** -7
    assert gen.bf16_step(-2.0) == 2 ** -6 and gen.bf16_step(0.0) == 0.0
    # consecutive bf16 values are one step apart
    for v in (3.0, 0.37, -1234.5):
        x = torch.tensor([v], dtype=torch.bfloat16)
        up = (x.view(torch.int16) + 1).view(torch.bfloat16)  # the next bf16 away from zero
        assert abs((up.float() - x.float()).item()) == gen.bf16_step(x.item())


@pytest.mark.parametrize("model", MODELS)
def test_int4_and_published_rows(run, model):
    status, out = run("--model", model, "--precisions", "bf16,int8,int4,published", "--json")
    assert status == 0
    rows = json_rows(out)
    fmt = {"qwen3": "fp8", "gpt-oss": "mxfp4"}[model]
    published = f"libmoe published ({fmt})"
    assert list(rows) == ["transformers", "libmoe bf16", "libmoe int8", "libmoe int4", published]
    int4, pub = rows["libmoe int4"], rows[published]
    assert int4["held_precision"] == "int4" and int4["precision"] == "int4"
    assert pub["held_precision"] == fmt and pub["precision"] == fmt
    assert {"qwen3": "Qwen/Qwen3-30B-A3B-FP8", "gpt-oss": "openai/gpt-oss-20b"}[model] \
        in pub["published_as"]
    assert "published_as" not in int4
    for r in (int4, pub):
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["moe_ms_per_token"] > 0
        assert len(r["tokens"]) == 4 and isinstance(r["tokens_equal"], bool)
    # bytes a decoded token reads: the k experts' matrices in the format's bits
    bf16, int8 = rows["libmoe bf16"]["bytes_per_token"], rows["libmoe int8"]["bytes_per_token"]
    assert int4["bytes_per_token"] < int8 < bf16
    c = rows["transformers"]
    k = {"qwen3": 4, "gpt-oss": 2}[model]
    d, F = 64, {"qwen3": 32, "gpt-oss": 64}[model]
    weights = 3 * d * F
    assert any(bf16 - int4["bytes_per_token"] == pytest.approx(k * weights * (2 - (4 + 32 / g) / 8))
               for g in (32, 64, 128))
    bits = {"fp8": 8 + 32 / (128 * 128), "mxfp4": 4 + 8 / 32}[fmt]
    assert bf16 - pub["bytes_per_token"] == pytest.approx(k * weights * (2 - bits / 8), rel=1e-3)
    assert c["variant"] == "transformers"


@pytest.mark.parametrize("model", MODELS)
def test_goal_lines(run, model):
    status, out = run("--model", model, "--precisions", "bf16,int4")
    assert status == 0
    lines = out.splitlines()
    at = lines.index("Goals (issue 21, part 5):")
    goals = lines[at + 1:]
    assert len(goals) == 3
    assert goals[0].startswith("  MoE blocks' time per new token, transformers bf16 / libmoe int4: ")
    assert goals[1].startswith("  time to first token, transformers bf16 / libmoe bf16 "
                               "[AMX machine]: ")
    assert goals[2].startswith("  bf16 tokens equal transformers' (the unreplaced model's): yes: ")
    assert all(": not judged (" in g for g in goals), goals  # --tiny sizes
    assert "libmoe bf16: tokens equal transformers' (the unreplaced model's), all 4 new " \
           "tokens." in lines

    status, out = run("--model", model, "--precisions", "bf16,int4", "--json")
    rows, gs = json_rows(out), json_goals(out)
    ref, bf16, int4 = rows["transformers"], rows["libmoe bf16"], rows["libmoe int4"]
    assert gs[0]["value"] == pytest.approx(ref["moe_ms_per_token"] / int4["moe_ms_per_token"])
    assert gs[1]["value"] == pytest.approx(ref["prefill_s"] / bf16["prefill_s"])
    assert gs[2]["value"] is bf16["tokens_equal"]
    assert [g["target"] for g in gs] == [3.0, 1.5, True]
    assert all(g["met"] is None for g in gs)


def fake_rows(ref_moe, int4_moe, ref_pre, bf16_pre, equal=True, near_tie=True):
    bf16 = {"variant": "libmoe bf16", "prefill_s": bf16_pre, "moe_ms_per_token": 4.0,
            "tokens": [1] * 8, "tokens_equal": equal, "first_difference": None if equal else 5}
    if not equal:
        bf16.update(reference_gap=0.0 if near_tie else 0.5, variant_gap=0.1,
                    reference_gap_steps=0.0 if near_tie else 16.0, near_tie=near_tie)
    return [{"variant": "transformers", "prefill_s": ref_pre, "moe_ms_per_token": ref_moe},
            bf16, {"variant": "libmoe int4", "prefill_s": 0.3, "moe_ms_per_token": int4_moe},
            {"variant": "libmoe int3", "skipped": "refused"}]


def test_goals_are_judged_at_full_sizes(gen, monkeypatch):
    monkeypatch.setattr(gen.moe, "cpu_info", lambda: {"best": "avx512_bf16"})
    gs = gen.goals(fake_rows(9.0, 3.0, 1.0, 0.5), tiny=False)
    assert [g["met"] for g in gs] == [True, None, True]  # no AMX: the TTFT goal not judged
    assert gs[0]["value"] == 3.0 and gs[1]["value"] == 2.0
    assert "no AMX" in gs[1]["detail"] and "avx512_bf16" in gs[1]["detail"]
    gs = gen.goals(fake_rows(8.9, 3.0, 1.0, 0.7, equal=False), tiny=False)
    assert gs[0]["met"] is False and gs[2]["met"] is False
    assert "new token 5" in gs[2]["detail"] and "was a near-tie" in gs[2]["detail"]
    gs = gen.goals(fake_rows(8.9, 3.0, 1.0, 0.7, equal=False, near_tie=False), tiny=False)
    assert "was NOT a near-tie" in gs[2]["detail"]
    assert "NOT a near-tie: bf16 rounding does not explain" in gs[2]["verdict"]

    monkeypatch.setattr(gen.moe, "cpu_info", lambda: {"best": "amx"})
    assert gen.goals(fake_rows(9.0, 3.0, 1.0, 0.7), tiny=False)[1]["met"] is False  # 1.43x
    assert gen.goals(fake_rows(9.0, 3.0, 1.0, 0.6), tiny=False)[1]["met"] is True
    assert [g["met"] for g in gen.goals(fake_rows(9.0, 3.0, 1.0, 0.6), tiny=True)] == [None] * 3
    # without an int4 row the goal is not measured
    rows = [r for r in fake_rows(9.0, 3.0, 1.0, 0.6) if r["variant"] != "libmoe int4"]
    g = gen.goals(rows, tiny=False)[0]
    assert g["value"] is None and g["met"] is None and "not measured" in g["detail"]


@pytest.mark.parametrize("ties", [True, False])
def test_router_near_ties(gen, threads, ties):
    """GPT-OSS's router with zero weights: its logits are its bias. A zero bias ties every
    expert (every choice a near-tie); a bias of 0, 1, 2, ... puts each pair a whole unit,
    many bf16 steps, apart (none)."""
    args = gen.parse_args(["--model", "gpt-oss", *TINY])
    m = gen.build_model(args)
    blocks = [n for n, mod in m.named_modules() if gen.is_block(mod)]
    E = m.config.num_local_experts
    with torch.no_grad():
        for n in blocks:
            router = m.get_submodule(n).router
            router.weight.zero_()
            router.bias.copy_(torch.zeros(E) if ties else torch.arange(E, dtype=torch.float32))
    ids = torch.randint(0, m.config.vocab_size, (1, args.prompt),
                        generator=torch.Generator().manual_seed(0))
    tokens, near, choices = gen.router_near_ties(m, ids, args, blocks)
    assert len(tokens) == args.new_tokens
    # step 0 is the prompt's forward, then one token a step; each in every block
    assert choices == [args.prompt * len(blocks)] + [len(blocks)] * (args.new_tokens - 1) + [0]
    assert near == (choices if ties else [0] * len(choices))


def test_fp64_grouped_mm_sums_each_group_in_float64(gen):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 40, generator=g).bfloat16()
    w = torch.randn(3, 40, 5, generator=g).bfloat16()
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # expert 1 has no rows
    out = gen.fp64_grouped_mm(x, w, offs)
    assert out.dtype == torch.bfloat16 and out.shape == (7, 5)
    for rows, e in ((slice(0, 2), 0), (slice(2, 7), 2)):
        want = gen.round_once(x[rows].double() @ w[e].double(), torch.bfloat16)
        assert torch.equal(out[rows], want)
    # Each output is the float64 sum rounded once: within half a bf16 step of it.
    exact = torch.cat([x[:2].double() @ w[0].double(), x[2:].double() @ w[2].double()])
    step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)
    assert ((out.double() - exact).abs() <= step / 2).all()


def test_fp64_sums_refuses_experts_not_grouped(gen):
    from types import SimpleNamespace
    model = SimpleNamespace(config=SimpleNamespace(_experts_implementation="eager"))
    with pytest.raises(ValueError, match="'eager', not 'grouped_mm'"):
        gen.Fp64Sums(model)


@pytest.mark.parametrize("model", MODELS)
def test_fp64_sums_row(gen, run, monkeypatch, model):
    """--fp64-sums: transformers' own blocks with their grouped products summed in float64,
    compared with transformers' tokens; its products really go through fp64_grouped_mm, and
    transformers' own function is back afterwards."""
    import transformers.integrations.moe as hf_moe
    original = hf_moe._grouped_mm
    calls, real = [], gen.fp64_grouped_mm

    def counted(input, weight, offs):
        calls.append(input.shape[0])
        return real(input, weight, offs)

    monkeypatch.setattr(gen, "fp64_grouped_mm", counted)
    status, out = run("--model", model, "--precisions", "bf16", "--fp64-sums", "--json")
    assert status == 0
    assert hf_moe._grouped_mm is original
    # two products a block call: the prompt's (16 tokens · k rows), then one token's
    assert calls and 16 * (4 if model == "qwen3" else 2) in calls
    rows = json_rows(out)
    assert list(rows) == ["transformers", "libmoe bf16", "transformers, fp64 sums"]
    fp64 = rows["transformers, fp64 sums"]
    assert fp64["precision"] == "fp64 sums" and fp64["held_precision"] is None
    assert len(fp64["tokens"]) == 4 and isinstance(fp64["tokens_equal"], bool)
    # its bytes are transformers' (bf16 experts), not a libmoe block's
    assert fp64["bytes_per_token"] == rows["transformers"]["bytes_per_token"]
    goal = [g for g in json_goals(out) if g["goal"].startswith("bf16 tokens equal")][0]
    assert "transformers' own blocks with fp64 sums" in goal["detail"]
    # the table prints no timings for it
    status, out = run("--model", model, "--precisions", "bf16", "--fp64-sums")
    line = [ln for ln in out.splitlines() if ln.startswith("transformers, fp64 sums")][0]
    cells = re.split(r"\s{2,}", line.strip())
    assert cells[1:8] == ["—"] * 7 and line.rstrip().endswith(
        "same" if fp64["tokens_equal"] else f"differ at {fp64['first_difference']}")


def test_round_once_rounds_float64_to_bf16_once(gen):
    """round_once against the nearest bf16 chosen exactly (Fraction distances, ties to the even
    mantissa), where torch's own cast rounds twice through float32."""
    from fractions import Fraction

    hand = torch.tensor([1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8 + 2 ** -30), 1 + 2 ** -8,
                         1 + 3 * 2 ** -8, 1 + 2 ** -8 - 2 ** -30, 0.0, 3.0], dtype=torch.float64)
    assert hand[:1].to(torch.bfloat16).item() == 1.0  # torch's cast: twice, through float32
    assert gen.round_once(hand, torch.bfloat16).tolist() == [
        1 + 2 ** -7, -(1 + 2 ** -7), 1.0, 1 + 2 ** -6, 1.0, 0.0, 3.0]

    def nearest(x):
        b = torch.tensor([x], dtype=torch.float64).float().to(torch.bfloat16)
        bits = b.view(torch.int16).item()
        cands = [torch.tensor([bits + d], dtype=torch.int16).view(torch.bfloat16).item()
                 for d in (-1, 0, 1)]
        dist = [abs(Fraction(c) - Fraction(x)) for c in cands]
        best = min(dist)
        ties = [(bits + d) for d, dd in zip((-1, 0, 1), dist) if dd == best]
        pick = min(ties, key=lambda t: t & 1)  # ties to the even last bit
        return torch.tensor([pick], dtype=torch.int16).view(torch.bfloat16).item()

    g = torch.Generator().manual_seed(5)
    m = torch.rand(400, generator=g, dtype=torch.float64) + 1.0
    # bf16 halfway points nudged by a float32-invisible amount: where double rounding goes wrong
    base = torch.round(m * 2 ** 7) / 2 ** 7 + 2 ** -8
    xs = torch.cat([m * 37.5, -m / 3, base + 2 ** -40, base - 2 ** -40])
    got = gen.round_once(xs, torch.bfloat16).tolist()
    assert got == [nearest(x) for x in xs.tolist()]
    assert xs.to(torch.bfloat16).tolist() != got  # the nudged points: torch's cast differs
