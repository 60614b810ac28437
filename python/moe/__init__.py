"""libmoe: Mixture-of-Experts layers on the CPU (docs/spec.md §5).

NumPy arrays in and out; any float dtype or memory layout is accepted and converted to
C-contiguous float32 at the boundary. Every validation failure raises ``moe.Error``, a
subclass of ``ValueError`` carrying the library's message.

    import numpy as np, moe
    layer = moe.MoE(d_model=16, n_experts=4, k=2, capacity_factor=1.25)
    y = layer.forward(np.random.randn(32, 16))
    dx = layer.backward(np.ones_like(y))
    layer.stats, layer.aux_loss, layer.grads["W1"]
"""
from ._moe import (  # noqa: F401
    Adam,
    AdamW,
    Error,
    MoE,
    Optimizer,
    Routing,
    SGD,
    clip_grad_norm,
    cpu_info,
    get_num_threads,
    inspect_pretrained,
    load_balancing_loss,
    load_safetensors,
    noisy_top_k_gating,
    route,
    save_safetensors,
    set_num_threads,
)

__all__ = [
    "Adam",
    "AdamW",
    "Error",
    "MoE",
    "Optimizer",
    "Routing",
    "SGD",
    "clip_grad_norm",
    "cpu_info",
    "get_num_threads",
    "inspect_pretrained",
    "load_balancing_loss",
    "load_safetensors",
    "noisy_top_k_gating",
    "route",
    "save_safetensors",
    "set_num_threads",
]
