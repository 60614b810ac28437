"""moe.hf.replace_moe_blocks against transformers' own modules: tiny models built in code
(no downloads), their MoE blocks replaced by moe.torch.MoE holding the same weights. The
logits agree to fp32 rounding, and ten AdamW steps of a causal-LM loss give the same losses."""
import copy
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moe.hf  # noqa: E402
import moe.torch  # noqa: E402


def tiny(model_type, norm_topk_prob=True):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    if model_type == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=6, moe_intermediate_size=40,
                                          norm_topk_prob=norm_topk_prob, decoder_sparse_step=1,
                                          head_dim=8, **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.OlmoeConfig(num_experts=6, norm_topk_prob=norm_topk_prob, **common)
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float()
    # Random router weights of order one, so that routing is decided by the inputs.
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "gate") and hasattr(mod, "experts"):
                mod.gate.weight.normal_(0, 0.5)
    return model


CASES = [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False), ("olmoe", False)]


@pytest.mark.parametrize("model_type,norm", CASES)
def test_logits_equal_after_replacement(model_type, norm):
    model = tiny(model_type, norm).eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    n = moe.hf.replace_moe_blocks(model)
    assert n == 2
    assert sum(isinstance(m, moe.torch.MoE) for m in model.modules()) == 2
    with torch.no_grad():
        after = model(ids).logits
    rel = (after - before).abs().max() / before.abs().max()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("model_type,norm", [("mixtral", True), ("qwen3_moe", False)])
def test_ten_adamw_steps_give_the_same_losses(model_type, norm):
    ref = tiny(model_type, norm).train()
    ours = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(ours)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 97, (2, 12), generator=g)] * 10  # one batch, learned in 10 steps
    losses = []
    for model in (ref, ours):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-4 * abs(a), (losses[0], losses[1])
    assert losses[0][-1] < losses[0][0]  # it trained


def test_other_families_are_refused_by_name():
    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        moe.hf.replace_moe_blocks(model)
