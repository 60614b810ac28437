"""moe.hf: libmoe as a drop-in for the MoE blocks of a loaded ``transformers`` model.

    import transformers, moe.hf
    model = transformers.AutoModelForCausalLM.from_pretrained(path)   # or built from a config
    moe.hf.replace_moe_blocks(model)          # every MoE block is now a moe.torch.MoE
    logits = model(input_ids).logits          # the same logits, libmoe's kernels underneath

Families whose block maps onto the library as it is today (the expert layout of
``transformers`` 5: a router ``gate.weight`` (E, d) and fused ``experts.gate_up_proj``
(E, 2F, d) / ``experts.down_proj`` (E, d, F), SwiGLU experts):

- ``mixtral``: softmax over all experts, top-k, renormalised;
- ``qwen3_moe``, ``olmoe``: the same, renormalised only when ``norm_topk_prob``.

Each block becomes a ``moe.torch.MoE`` (router "softmax_topk", swiglu experts, no noise, no
capacity limit, no auxiliary loss: these models add their router loss at the model level,
from router logits that the replaced block no longer records) holding the same weights,
transposed to the library's "in × out" convention. Training the replaced model trains the
library's parameters. Other families (shared experts of their own width, sigmoid routers,
quantised experts) are refused by name: they need the loader of docs/spec.md §7.
"""
from __future__ import annotations

import torch
from torch import nn

from . import torch as moe_torch

__all__ = ["replace_moe_blocks", "FAMILIES"]

FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


def _renormalize(model_type: str, config) -> bool:
    if model_type == "mixtral":
        return True
    return bool(getattr(config, "norm_topk_prob", False))


def _convert(block: nn.Module, model_type: str, config, precision: str) -> nn.Module:
    gate, experts = block.gate, block.experts
    W_g = gate.weight.detach()  # (E, d)
    E, d = W_g.shape
    gate_up = experts.gate_up_proj.detach()  # (E, 2F, d): gate rows first, then up rows
    down = experts.down_proj.detach()        # (E, d, F)
    F = down.shape[-1]
    if gate_up.shape != (E, 2 * F, d):
        raise ValueError(f"{model_type}: experts.gate_up_proj has shape {tuple(gate_up.shape)}, "
                         f"expected {(E, 2 * F, d)}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type}: hidden_act '{act}' is not supported (libmoe's swiglu "
                         f"experts use silu)")
    if getattr(config, "router_jitter_noise", 0.0):
        raise ValueError(f"{model_type}: router_jitter_noise = {config.router_jitter_noise} is "
                         f"not supported (it scales the experts' input too)")
    m = moe_torch.MoE(d, E, int(gate.top_k), expert="swiglu", d_ff=F, noise="none",
                      aux_alpha=0.0, z_alpha=0.0, router="softmax_topk",
                      renormalize=_renormalize(model_type, config), capacity_factor=None,
                      precision=precision)
    with torch.no_grad():
        m.W_g.copy_(W_g.t())
        m.W1.copy_(gate_up[:, :F, :].transpose(1, 2))
        m.W3.copy_(gate_up[:, F:, :].transpose(1, 2))
        m.W2.copy_(down.transpose(1, 2))
    m.train(block.training)
    return m


def replace_moe_blocks(model: nn.Module, precision: str = "fp32") -> int:
    """Replaces every MoE block of ``model`` (a ``transformers`` model of one of FAMILIES)
    with a ``moe.torch.MoE`` holding the same weights; returns how many were replaced."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type '{model_type}': not one of the families this drop-in "
                         f"supports ({', '.join(FAMILIES)})")
    blocks = [(name, mod) for name, mod in model.named_modules()
              if hasattr(mod, "gate") and hasattr(mod, "experts")
              and hasattr(getattr(mod, "experts"), "gate_up_proj")]
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _convert(block, model_type, config, precision))
    if not blocks:
        raise ValueError(f"{model_type}: no MoE block (gate + experts.gate_up_proj) found")
    return len(blocks)
