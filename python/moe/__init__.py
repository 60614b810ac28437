"""libmoe: Mixture-of-Experts layers on the CPU (SPEC §5).

NumPy arrays in and out; any float dtype or memory layout is accepted and converted to
C-contiguous float32 at the boundary. Every validation failure raises ``moe.Error``, a
subclass of ``ValueError`` carrying the library's message.

    import numpy as np, moe
    layer = moe.MoE(d_model=16, n_experts=4, k=2, capacity_factor=1.25)
    y = layer.forward(np.random.randn(32, 16))
    dx = layer.backward(np.ones_like(y))
    layer.stats, layer.aux_loss, layer.grads["W1"]
"""
from . import _moe
from ._moe import (  # noqa: F401
    Error,
    Routing,
    get_num_threads,
    noisy_top_k_gating,
    route,
    set_num_threads,
)

__all__ = [
    "Error",
    "Routing",
    "get_num_threads",
    "noisy_top_k_gating",
    "route",
    "set_num_threads",
]

# Parts that land with the layer, checkpoints and optimizers.
for _name in ("MoE", "load_balancing_loss", "SGD", "Adam", "AdamW", "clip_grad_norm"):
    if hasattr(_moe, _name):
        globals()[_name] = getattr(_moe, _name)
        __all__.append(_name)
del _name
