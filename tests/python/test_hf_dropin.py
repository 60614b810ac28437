"""moe.hf.replace_moe_blocks against transformers' own modules, for the eight families of the
pretrained loader: tiny causal LMs built in code (no downloads; the builders of
test_pretrained_hf.py, random MoE weights of order one so that routing is decided by the
inputs), their MoE blocks replaced by moe.torch.MoE built from the same weights. The logits
agree to fp32 rounding, the recorded router logits and the router loss too, and ten AdamW
steps of a causal-LM loss (with and without the router loss) give the same losses."""
import copy
import io
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moe.hf  # noqa: E402
import moe.torch  # noqa: E402
import test_pretrained_hf as hf_models  # noqa: E402  (tests/python is on sys.path)

FAMILIES = hf_models.FAMILIES
assert tuple(FAMILIES) == moe.hf.FAMILIES


def tiny(family, **over):
    return hf_models.build(family, **over)


def n_moe_layers(model):
    return len(hf_models.moe_layers(model.config.model_type, model.config))


def ids_batch(model, shape=(2, 11), seed=1):
    return torch.randint(0, model.config.vocab_size, shape,
                         generator=torch.Generator().manual_seed(seed))


def adamw_steps(model, ids, steps=10):
    """(loss, router loss or None) of each of `steps` AdamW steps (lr 1e-3, eps 1e-5) of the
    causal-LM loss on one batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5)
    run = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        aux = getattr(out, "aux_loss", None)
        run.append((out.loss.item(), None if aux is None else aux.item()))
    return run


CASES = [(f, {}) for f in FAMILIES] + [
    ("qwen3_moe", {"norm_topk_prob": False}), ("olmoe", {"norm_topk_prob": True}),
    ("qwen2_moe", {"norm_topk_prob": True}), ("deepseek_v3", {"norm_topk_prob": False}),
    ("deepseek_v2", {"topk_method": "greedy", "n_group": 1, "topk_group": 1}),
    ("gpt_oss", {"swiglu_limit": 0.6})]


@pytest.mark.parametrize("family,over", CASES, ids=lambda v: str(v) if v else "default")
def test_logits_equal_after_replacement(family, over):
    model = tiny(family, **over).eval()
    ids = ids_batch(model)
    with torch.no_grad():
        before = model(ids).logits
    n = moe.hf.replace_moe_blocks(model)
    assert n == n_moe_layers(model) >= 2
    assert sum(isinstance(m, moe.torch.MoE) for m in model.modules()) == n
    assert not any(hf_models.moe_block(model, i).training for i in hf_models.moe_layers(
        family, model.config))
    with torch.no_grad():
        after = model(ids).logits
    rel = (after - before).abs().max() / before.abs().max()
    assert rel < 1e-5, rel
    # not a pass on a negligible MoE contribution: the blocks' outputs move the logits
    layer = hf_models.moe_layers(family, model.config)[-1]
    block = hf_models.moe_block(model, layer)
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(0.5)
        moved = model(ids).logits
    assert (moved - after).abs().max() > 1e-3 * after.abs().max()


def test_bf16_precision():
    """precision="bf16": the replaced blocks run bf16 expert products; each gives its
    original block's output to bf16 rounding (the logits of a 3-layer model also see
    routing flips that bf16 differences in earlier layers cause, so the blocks are compared)."""
    model = tiny("qwen2_moe").eval()
    layers = hf_models.moe_layers("qwen2_moe", model.config)
    originals = [hf_models.moe_block(model, i) for i in layers]
    moe.hf.replace_moe_blocks(model, precision="bf16")
    x = torch.randn(1, 37, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for i, orig in zip(layers, originals):
        block = hf_models.moe_block(model, i)
        assert isinstance(block, moe.torch.MoE) and block.config["precision"] == "bf16"
        with torch.no_grad():
            y_ref, y = orig(x), block(x)
        rel = (y - y_ref).abs().max() / y_ref.abs().max()
        assert 0 < rel < 2e-2, (i, rel)


@pytest.mark.parametrize("precision,bound", [("int4", 0.3), ("mxfp4", 0.3), ("fp8", 0.08),
                                             ("int8", 0.05), ("auto", 1e-5)])
def test_low_bit_precisions(precision, bound):
    """The evaluation-only precisions: each replaced block holds its experts in that format
    alone (no fp32 masters) and gives its original block's output within what the format
    costs; "auto" of an fp32 model keeps fp32 (the same output to rounding)."""
    model = tiny("qwen3_moe").eval()
    layers = hf_models.moe_layers("qwen3_moe", model.config)
    originals = [hf_models.moe_block(model, i) for i in layers]
    moe.hf.replace_moe_blocks(model, precision=precision)
    x = torch.randn(1, 23, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for i, orig in zip(layers, originals):
        block = hf_models.moe_block(model, i)
        want = "fp32" if precision == "auto" else precision
        assert isinstance(block, moe.torch.MoE) and block.config["precision"] == want
        with torch.no_grad():
            y_ref, y = orig(x), block(x)
        rel = ((y - y_ref).norm() / y_ref.norm()).item()
        assert rel < bound and (precision == "auto" or rel > 1e-4), (i, rel)
    with torch.no_grad():  # and the model runs
        assert torch.isfinite(model(ids_batch(model)).logits).all()


def test_auto_of_a_quantized_model_is_refused_by_name():
    model = tiny("qwen3_moe").eval()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match=r"precision='auto' of a model loaded with "
                                         r"quantization_config \(gptq\)"):
        moe.hf.replace_moe_blocks(model, precision="auto")


@pytest.mark.parametrize("family", FAMILIES)
def test_ten_adamw_steps_give_the_same_losses(family):
    """AdamW with eps = 1e-5 rather than 1e-8: its first updates are lr * g / (|g| + eps), i.e.
    lr * sign(g) wherever |g| >> eps, so with eps = 1e-8 an element whose gradient lies within
    fp32 rounding of zero (the two implementations sum in different orders; their gradients
    agree to about 1e-6 relative) can move by +lr in one model and -lr in the other, and the
    routing that follows amplifies it (seen on OLMoE: losses 1e-3 apart after ten steps with
    the same experts chosen at the first steps). eps = 1e-5 keeps such updates in proportion
    to the gradient; the losses then agree to better than 1e-6 (measured: 5e-7 at most)."""
    ref = tiny(family).train()
    ours = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(ours)
    assert all(hf_models.moe_block(ours, i).training
               for i in hf_models.moe_layers(family, ours.config))
    ids = ids_batch(ref, (2, 12), seed=2)  # one batch, learned in 10 steps
    losses = [[loss for loss, _ in adamw_steps(model, ids)] for model in (ref, ours)]
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-4 * abs(a), (losses[0], losses[1])
    assert losses[0][-1] < losses[0][0]  # it trained


def test_other_families_are_refused_by_name():
    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        moe.hf.replace_moe_blocks(model)


def test_jitter_noise_is_refused():
    model = tiny("mixtral", router_jitter_noise=0.1)
    with pytest.raises(ValueError, match="mixtral: router_jitter_noise = 0.1"):
        moe.hf.replace_moe_blocks(model)


def test_quantised_in_memory_experts_are_refused_and_nothing_is_replaced():
    model = tiny("deepseek_v3")
    block = hf_models.moe_block(model, 2)
    block.experts.gate_up_proj = torch.nn.Parameter(
        block.experts.gate_up_proj.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"deepseek_v3: MoE block 'model\.layers\.2\.mlp': "
                                         r"tensor 'experts\.gate_up_proj' .*float8"):
        moe.hf.replace_moe_blocks(model)
    assert not any(isinstance(m, moe.torch.MoE) for m in model.modules())


def test_loader_errors_name_the_family():
    model = tiny("qwen3_moe", hidden_act="gelu")
    with pytest.raises(ValueError, match=r"qwen3_moe: MoE block 'model\.layers\.0\.mlp': "
                                         r".*hidden_act"):
        moe.hf.replace_moe_blocks(model)


def run_with_router_logits(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids, output_router_logits=True)


@pytest.mark.parametrize("hooked_before", [False, True], ids=["fresh", "hooked-before"])
@pytest.mark.parametrize("family", FAMILIES)
def test_router_logits_and_router_loss_equal(family, hooked_before):
    """output_router_logits=True: the replaced blocks record, for every MoE layer, the logits
    the family's router records (the same tuple entry, shape and dtype), and the model's
    router loss (aux_loss, added to the loss) is the original's. hooked-before: the model
    ran a forward asking for outputs before the replacement, so transformers had hooked its
    own routers then and the new blocks are hooked by replace_moe_blocks."""
    ref = tiny(family).eval()
    ours = copy.deepcopy(ref)
    ids = ids_batch(ref)
    if hooked_before:
        run_with_router_logits(ours, ids)
    moe.hf.replace_moe_blocks(ours)
    a, b = run_with_router_logits(ref, ids), run_with_router_logits(ours, ids)
    assert len(a.router_logits) == len(b.router_logits) == n_moe_layers(ref)
    for x, y in zip(a.router_logits, b.router_logits):
        assert x.shape == y.shape and x.shape[0] == 22 and x.dtype == y.dtype
        assert (y - x).abs().max() <= 1e-5 * x.abs().max()
    if family.startswith("deepseek"):  # no router loss in these models
        assert a.aux_loss is None and b.aux_loss is None
    else:
        assert abs(b.aux_loss.item() - a.aux_loss.item()) <= 1e-5 * abs(a.aux_loss.item())
    assert abs(b.loss.item() - a.loss.item()) <= 1e-5 * abs(a.loss.item())
    # without output_router_logits nothing is recorded and the logits are the same
    with torch.no_grad():
        plain = ours(ids)
    assert getattr(plain, "router_logits", None) is None
    assert torch.allclose(plain.logits, b.logits)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("deepseek")])
def test_adamw_steps_with_the_router_loss_give_the_same_losses(family):
    """Training with the router loss (output_router_logits=True, a coefficient of 0.5 so that
    it matters): its gradient reaches the library's W_g through the recorded logits and adds
    to the library's own, so ten AdamW steps give the original's losses and router losses
    (eps = 1e-5: see test_ten_adamw_steps_give_the_same_losses; measured: 2.4e-7 apart at
    most. At lr = 1e-2 the routing flips that ulp-level gradient differences cause made
    Qwen3-MoE's losses drift 1e-3 apart by the tenth step)."""
    ref = tiny(family, output_router_logits=True, router_aux_loss_coef=0.5).train()
    ours = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(ours)
    ids = ids_batch(ref, (2, 12), seed=2)
    runs = [adamw_steps(model, ids) for model in (ref, ours)]
    for (la, aa), (lb, ab) in zip(*runs):
        assert abs(la - lb) <= 1e-4 * abs(la) and abs(aa - ab) <= 1e-4 * abs(aa), runs
    assert runs[0][-1][1] != runs[0][0][1]  # the router loss moved


def test_router_logits_refused_without_a_recorder_to_serve(monkeypatch):
    """A transformers that declares no router-logits recorder (other versions): asking for
    router logits after the replacement is a clear error, not a failure inside transformers."""
    monkeypatch.setattr(moe.hf, "_router_spec", lambda model: None)
    model = tiny("mixtral")
    moe.hf.replace_moe_blocks(model)
    ids = ids_batch(model)
    with pytest.raises(ValueError, match="mixtral: output_router_logits=True"):
        model(ids, labels=ids, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits=True"):
        model.model(ids)
    assert model(ids, output_router_logits=False).logits.shape == (2, 11, 64)


def test_replaced_model_copies():
    """copy.deepcopy (and torch.save) of a replaced model: the libmoe blocks, GPT-OSS's
    tuple-returning one included, rebuild their layers with the same weights, and their
    router-logits recorders (hooks included, for a copy made after a forward hooked them)."""
    model = tiny("gpt_oss").eval()
    moe.hf.replace_moe_blocks(model)
    ids = ids_batch(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    a, b = run_with_router_logits(model, ids), run_with_router_logits(twin, ids)
    assert all(torch.equal(x, y) for x, y in zip(a.router_logits, b.router_logits))
    # a copy made after transformers hooked the recorders records too
    late = copy.deepcopy(model)
    c = run_with_router_logits(late, ids)
    assert len(c.router_logits) == len(a.router_logits)
    assert all(torch.equal(x, y) for x, y in zip(a.router_logits, c.router_logits))
    # torch.save of a model no forward has hooked yet
    fresh = tiny("mixtral").eval()
    moe.hf.replace_moe_blocks(fresh)
    buf = io.BytesIO()
    torch.save(fresh, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    d, e = run_with_router_logits(fresh, ids), run_with_router_logits(back, ids)
    assert torch.equal(d.logits, e.logits)
    assert all(torch.equal(x, y) for x, y in zip(d.router_logits, e.router_logits))


def test_bf16_without_masters_holds_the_same_blocks_in_a_third_of_the_memory():
    """masters=False: the bf16 blocks hold their bf16 experts alone (no W1/W2/W3 masters),
    evaluate bit for bit as the blocks with masters do, and are refused for a model in
    training mode (they could not train)."""
    model = tiny("qwen3_moe").to(torch.bfloat16).eval()
    layers = hf_models.moe_layers("qwen3_moe", model.config)
    with_masters = copy.deepcopy(model)
    moe.hf.replace_moe_blocks(with_masters, precision="bf16")
    moe.hf.replace_moe_blocks(model, precision="bf16", masters=False)
    x = torch.randn(1, 9, model.config.hidden_size,
                    generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for i in layers:
        lean, full = hf_models.moe_block(model, i), hf_models.moe_block(with_masters, i)
        assert "W1" in dict(full.named_parameters()) and "W1" not in dict(lean.named_parameters())
        with torch.no_grad():
            assert torch.equal(lean(x), full(x))
    training = tiny("qwen3_moe").to(torch.bfloat16).train()
    with pytest.raises(ValueError, match="masters=False makes the blocks evaluation-only"):
        moe.hf.replace_moe_blocks(training, precision="bf16", masters=False)
    assert n_moe_layers(training) and not any(isinstance(m, moe.torch.MoE)
                                              for m in training.modules())
