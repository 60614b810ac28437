"""libmoe: Mixture-of-Experts layers on the CPU (SPEC §5).

NumPy arrays in and out; any float dtype or memory layout is accepted and converted to
C-contiguous float32 at the boundary. Every validation failure raises ``moe.Error``, a
subclass of ``ValueError`` carrying the library's message.
"""
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

try:  # lands with the layer
    from ._moe import load_balancing_loss  # noqa: F401

    __all__.append("load_balancing_loss")
except ImportError:
    pass
