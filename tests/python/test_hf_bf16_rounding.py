"""moe.hf.replace_moe_blocks on a bf16 model rounds as transformers' bf16 block does
(docs/routing.md, "Rounding as transformers"): router logits rounded to bf16 and their ties
broken in torch.topk's order, gate weights in the model's dtype where the family casts them,
and, in precision bf16, each expert step rounded. Oracles: torch.topk itself, and the
families' own transformers modules (tiny models built in code:
tests/python/test_pretrained_hf.py)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moe  # noqa: E402
import moe.hf  # noqa: E402
import test_pretrained_hf as hf_models  # noqa: E402  (tests/python is on sys.path)


@pytest.mark.parametrize("E,k", [(128, 8), (60, 4), (64, 1), (1024, 8), (8, 2)])
def test_tie_break_torch_chooses_and_orders_as_torch_topk(E, k):
    """Integer logits tie everywhere; (1024, 8) takes torch's partial-sort path (k·64 <= E),
    the others its selection path."""
    logits = torch.randint(0, 12, (500, E), generator=torch.Generator().manual_seed(E + k)).float()
    r = moe.route(logits.numpy(), np.eye(E, dtype=np.float32), k, tie_break="torch",
                  training=False)
    _, ref = torch.topk(logits, k, dim=-1)
    np.testing.assert_array_equal(np.asarray(r.indices), ref.numpy())
    # Not vacuous: a fixed order decides some of these ties otherwise.
    high = moe.route(logits.numpy(), np.eye(E, dtype=np.float32), k, tie_break="high",
                     training=False)
    assert (np.asarray(high.indices) != ref.numpy()).any()


def router(block):
    return block.gate if hasattr(block, "gate") else block.router  # GPT-OSS: router


def output(y):
    return (y[0] if isinstance(y, tuple) else y).float()  # GPT-OSS: (hidden, scores)


def routed_blocks(family):
    model = hf_models.build(family).to(torch.bfloat16).eval()
    layers = hf_models.moe_layers(family, model.config)
    originals = [hf_models.moe_block(model, i) for i in layers]
    with torch.no_grad():  # router weights on a coarse grid: with the inputs', logits tie
        for b in originals:
            router(b).weight.copy_((router(b).weight * 4).round() / 4)
    moe.hf.replace_moe_blocks(model, precision="bf16")
    return model, [(orig, hf_models.moe_block(model, i)) for i, orig in zip(layers, originals)]


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "gpt_oss"])
def test_bf16_blocks_choose_transformers_experts_and_round_as_it_does(family):
    model, blocks = routed_blocks(family)
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(5)
    # One token a call (a decode step); inputs on a coarse grid, so that bf16 logits tie.
    xs = ((torch.randn(96, 1, 1, H, generator=g) * 2).round() / 2).to(torch.bfloat16)
    for orig, new in blocks:
        cfg = new.layer.config
        assert cfg["round_router_logits"] and cfg["round_each_op"]
        assert cfg["tie_break"] == "torch"
        assert cfg["round_gate_weights"] == (family != "mixtral")  # Mixtral keeps fp32 weights
        ties = 0
        mismatched = {True: 0, False: 0}
        for x in xs:
            with torch.no_grad():
                logits, _, idx_ref = router(orig)(x.reshape(1, H))
                top = torch.sort(logits.float(), descending=True).values[0]
                ties += int(top[cfg["k"] - 1] == top[cfg["k"]])
                y_ref = output(orig(x))
                for rounded in (False, True):
                    new.layer.set_rounding(rounded, rounded and cfg["round_gate_weights"],
                                           rounded, "torch" if rounded else "high")
                    y = output(new(x))
                    mismatched[rounded] += int((y != y_ref).sum())
                    if rounded:  # the same experts, in the same order
                        np.testing.assert_array_equal(np.asarray(new.layer.routing.indices),
                                                      idx_ref.numpy())
        total = xs.shape[0] * H
        assert ties > 0, "no router tie: a vacuous case"
        # Rounded: bit for bit but where an fp32 sum lands by a bf16 rounding boundary in
        # another order than torch's GEMM; unrounded: one bf16 rounding of fp32 results.
        assert mismatched[True] <= 0.02 * total, mismatched
        assert mismatched[True] * 5 < mismatched[False], mismatched


def first_block_config(model):
    layer = hf_models.moe_layers("qwen3_moe", model.config)[0]
    return hf_models.moe_block(model, layer).layer.config


def test_rounding_stays_off_for_fp32_models_and_other_precisions():
    model = hf_models.build("qwen3_moe").eval()  # fp32: SPEC §6 as it stands
    moe.hf.replace_moe_blocks(model, precision="bf16")
    cfg = first_block_config(model)
    assert not (cfg["round_router_logits"] or cfg["round_gate_weights"] or cfg["round_each_op"])
    model = hf_models.build("qwen3_moe").to(torch.bfloat16).eval()
    moe.hf.replace_moe_blocks(model, precision="int4")
    cfg = first_block_config(model)
    assert cfg["round_router_logits"] and cfg["tie_break"] == "torch" and not cfg["round_each_op"]


def test_round_each_op_needs_bf16():
    with pytest.raises(ValueError, match="round_each_op: .*needs precision bf16"):
        moe.MoE(8, 4, 2, expert="swiglu", d_ff=8, round_each_op=True)
    with pytest.raises(ValueError, match="tie_break: 'torch' applies to token-choice"):
        moe.MoE(8, 4, 2, tie_break="torch", n_groups=2)
