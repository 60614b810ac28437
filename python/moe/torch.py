"""moe.torch: the libmoe layer as a ``torch.nn.Module`` (SPEC §8).

    import torch, moe.torch
    layer = moe.torch.MoE(d_model=64, n_experts=8, k=2, capacity_factor=1.25)
    y = layer(torch.randn(4, 16, 64))            # [..., d_model] -> [..., d_out]
    loss = y.square().mean() + layer.aux_loss + layer.z_loss
    loss.backward()                              # autograd runs the library's backward

The keywords are those of ``moe.MoE``. The parameters (``W_g``, ``W1``, ... as
``moe.MoE`` names them) are float32 ``nn.Parameter``s whose storage IS the C++ layer's
buffers: an optimizer's in-place update is what the next forward computes with, with no copy.

Forward and backward run as two ``torch.library`` custom ops, ``moe::forward`` and
``moe::backward``, with fake implementations, so ``torch.compile(model, fullgraph=True)``
traces the layer without graph breaks. A forward autograd does not record and nothing traces
(``torch.no_grad()``, ``torch.inference_mode()``) calls the layer directly: the same forward
without the op's dispatch.

Gradient rule. ``module.aux_loss`` and ``module.z_loss`` are differentiable 0-d tensors made
by each forward. The gradient of whatever you differentiate is exact: each loss term counts
as many times as it appears in your objective. The usual objective,
``task_loss + module.aux_loss + module.z_loss``, costs one library backward (the library's
backward always adds both loss terms, with coefficient 1). Any other coefficient of a
term whose weight (``aux_alpha``, ``z_alpha``) is not zero — leaving ``aux_loss`` out of the
objective, say — costs a second backward that removes or rescales it.

Other rules:
- A forward's saved state lives in the C++ layer, which keeps one. When a module is called
  again before the earlier call's backward (weight sharing, two micro-batches summed into one
  loss), that backward first recomputes its forward from the saved input and noise step, so
  gradients stay exact; the recomputation also counts again in ``aux_loss='global'`` loads
  and in the load that ``update_expert_bias`` reads.
- Training mode (``module.train()``) draws fresh router noise per forward from the layer's
  seed and step counter; ``module.eval()`` runs the evaluation forward.
- Parameters stay float32 on the CPU; ``precision='bf16'`` (a keyword of ``moe.MoE``) is the
  way to run bf16 expert products. Inputs may be float32 or bfloat16; the output has the
  input's dtype.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from . import _moe

__all__ = ["MoE", "reference_f64"]

# ---- the layers the custom ops act on -----------------------------------------------------
# A custom op takes tensors and plain numbers, so each module's C++ layer is registered
# under an integer handle that the module passes to the ops.


class _Entry:
    __slots__ = ("layer", "names", "synced", "last_key", "grads_clean", "__weakref__")

    def __init__(self, layer):
        self.layer = weakref.ref(layer)
        self.names = list(layer.parameter_names)
        self.synced = {}       # name -> (data_ptr, _version) last handed to the layer
        self.last_key = None   # identity of the forward whose state the layer holds
        self.grads_clean = False  # the layer's gradient buffers are zero


_entries: dict[int, _Entry] = {}
_handles = itertools.count(1)


def _register(layer) -> int:
    h = next(_handles)
    _entries[h] = _Entry(layer)
    weakref.finalize(layer, _entries.pop, h, None)
    return h


def _entry(handle: int) -> tuple[_Entry, object]:
    e = _entries.get(handle)
    layer = e.layer() if e is not None else None
    if layer is None:
        raise _moe.Error(f"moe.torch: layer handle {handle} no longer exists")
    return e, layer


def _sync_params(e: _Entry, layer, params) -> None:
    """Make the C++ layer compute with `params`. They normally share its buffers; one that
    does not (load_state_dict(assign=True), opcheck's copies) is copied in. A changed
    _version (an optimizer step, load_state_dict) tells the layer its weights changed."""
    changed = False
    for name, p in zip(e.names, params):
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise _moe.Error(
                f"{name}: moe.torch.MoE keeps float32 parameters on the CPU, got {p.dtype} on "
                f"{p.device} (precision='bf16' runs the experts in bf16)")
        ptr = p.data_ptr()
        if ptr != layer._buffer_address(name):
            torch.from_numpy(layer._buffer(name)).copy_(p.detach().reshape(
                tuple(layer._buffer(name).shape)))
            changed = True
            e.synced[name] = None
            continue
        key = (ptr, p._version)
        if e.synced.get(name) != key:
            changed = changed or name in e.synced
            e.synced[name] = key
    if changed and hasattr(layer, "weights_changed"):
        layer.weights_changed()


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _forward_key(x: torch.Tensor, step: int, training: bool):
    return (x.data_ptr(), x._version, tuple(x.shape), x.dtype, step, training)


# ---- the custom ops -------------------------------------------------------------------


def _run_forward(x: torch.Tensor, params: list[torch.Tensor], handle: int, training: bool):
    """The layer `handle`'s forward on x (T, d_model): (y (T, d_out) in x's dtype, the layer,
    the noise step it used). The body of moe::forward, and of a forward autograd does not
    record (MoE.forward calls it without the op then)."""
    e, layer = _entry(handle)
    _sync_params(e, layer, params)
    step = int(layer.step)
    e.last_key = None
    y = layer.forward(_as_f32(x).numpy(), training=training, step=step)
    if training:
        layer.step = step + 1
    e.last_key = _forward_key(x, step, training)
    return torch.from_numpy(y).to(x.dtype), layer, step


def _untraced(x: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether a forward on x needs no custom op: autograd records nothing (grad mode off, or
    nothing requires grad) and nothing traces or intercepts torch calls (torch.compile, fake
    or subclass tensors, a dispatch or torch-function mode). Then the layer is called
    directly, without the op's dispatch and its returned tensors (in a decode step, where
    the weights streamed since the last call have evicted the interpreter's working set,
    those cost ~65 us a call: docs/pytorch.md, "torch.compile, custom ops, checks")."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled())


@torch.library.custom_op("moe::forward", mutates_args=())
def _forward(x: torch.Tensor, params: list[torch.Tensor], handle: int,
             training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (T, d_out) in x's dtype, aux_loss, z_loss (0-d float32) and the forward's state
    (int64 [step, training]) of the layer `handle` on x (T, d_model)."""
    out, layer, step = _run_forward(x, params, handle, training)
    aux = torch.tensor(layer.aux_loss, dtype=torch.float32)
    z = torch.tensor(layer.z_loss, dtype=torch.float32)
    return out, aux, z, torch.tensor([step, int(training)], dtype=torch.int64)


@_forward.register_fake
def _(x, params, handle, training):
    e = _entries.get(handle)
    layer = e.layer() if e is not None else None
    d_out = layer.d_out if layer is not None else x.shape[1]
    return (x.new_empty((x.shape[0], d_out)), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32), x.new_empty((2,), dtype=torch.int64))


def _active(layer):
    c = layer.config
    aux = c["aux_alpha"] != 0.0 and c["aux_loss"] != "none"
    return aux, c["z_alpha"] != 0.0


def _z_loss_grads(e: _Entry, layer, x: torch.Tensor, params, scale: float):
    """scale·∂z_loss/∂(x, params) of the layer's last forward, from its router logits h:
    z = c_z/T·Σ_t logsumexp(h_t)², h = x̃·W_g (+ b_g), x̃ = x times the jitter factors."""
    r = layer.routing
    h = torch.from_numpy(r.logits).double()
    T = h.shape[0]
    lse = torch.logsumexp(h, dim=1, keepdim=True)
    dh = (scale * layer.config["z_alpha"] * 2.0 / T) * lse * torch.softmax(h, dim=1)
    xd = x.detach().double()
    jit = torch.from_numpy(r.jitter).double() if r.jitter is not None else None
    xt = xd * jit if jit is not None else xd
    by_name = dict(zip(e.names, params))
    grads = {"W_g": xt.T @ dh}
    if "b_g" in by_name:
        grads["b_g"] = dh.sum(0)
    dx = dh @ by_name["W_g"].detach().double().T
    if jit is not None:
        dx = dx * jit
    return dx, grads


@torch.library.custom_op("moe::backward", mutates_args=())
def _backward(dy: torch.Tensor, daux: torch.Tensor, dz: torch.Tensor, x: torch.Tensor,
              state: torch.Tensor, params: list[torch.Tensor], handle: int) -> list[torch.Tensor]:
    """[dx, grad of each parameter] of <dy, y> + daux·aux_loss + dz·z_loss for the forward
    that made `state` from x."""
    e, layer = _entry(handle)
    step, training = (int(v) for v in state.tolist())
    if e.last_key != _forward_key(x, step, bool(training)):
        # The layer holds another forward's state: recompute this one (same input, noise step
        # and weights give the same routing and activations).
        _sync_params(e, layer, params)
        e.last_key = None
        layer.forward(_as_f32(x).numpy(), training=bool(training), step=step)
        e.last_key = _forward_key(x, step, bool(training))
    dy32 = _as_f32(dy)
    if not e.grads_clean:  # the layer's gradient buffers hold something: start from zero
        layer.zero_grad()
    e.grads_clean = False
    dx = torch.from_numpy(layer.backward(dy32.numpy()))
    # The gradients leave the layer without a copy; it keeps zeroed buffers (reused from the
    # ones torch has dropped: GradPool in moe_py.cpp).
    grads = [torch.from_numpy(layer._take_grad(n)) for n in e.names]
    e.grads_clean = True
    # The library's backward added 1·∂aux + 1·∂z; move each coefficient to the wanted one.
    aux_on, z_on = _active(layer)
    ca = float(daux) - 1.0 if aux_on else None
    cz = float(dz) - 1.0 if z_on else None
    if ca is None:
        ca = cz
    if cz is None:
        cz = ca
    if ca is not None and (ca != 0.0 or cz != 0.0):
        # One backward with dy = 0 gives ∂aux + ∂z; the z part alone comes from the router
        # logits when the two coefficients differ.
        e.grads_clean = False
        dx0 = torch.from_numpy(layer.backward(torch.zeros_like(dy32).numpy())).double()
        dx = dx.double() + ca * dx0
        g0 = {n: torch.from_numpy(layer._buffer(n, True)).double() for n in e.names}
        corr = {n: ca * g for n, g in g0.items()}
        if cz != ca:
            dxz, gz = _z_loss_grads(e, layer, x, params, cz - ca)
            dx = dx + dxz
            for n, g in gz.items():
                corr[n] = corr[n] + g
        grads = [(g.double() + corr[n]).to(torch.float32) for n, g in zip(e.names, grads)]
    return [dx.to(x.dtype)] + grads


@_backward.register_fake
def _(dy, daux, dz, x, state, params, handle):
    return [x.new_empty(x.shape)] + [p.new_empty(p.shape) for p in params]


def _setup_context(ctx, inputs, output):
    x, params, handle, training = inputs
    ctx.handle = handle
    ctx.y_shape = output[0].shape
    ctx.save_for_backward(x, output[3], *params)
    ctx.mark_non_differentiable(output[3])


def _autograd_backward(ctx, dy, daux, dz, dstate):
    x, state, *params = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros(ctx.y_shape)
    if daux is None:
        daux = torch.zeros((), dtype=torch.float32)
    if dz is None:
        dz = torch.zeros((), dtype=torch.float32)
    out = torch.ops.moe.backward(dy, daux, dz, x, state, params, ctx.handle)
    return out[0], list(out[1:]), None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---- the module -------------------------------------------------------------------------


class MoE(nn.Module):
    """A libmoe Mixture-of-Experts layer as an ``nn.Module``: the keywords of ``moe.MoE``;
    ``forward(x)`` maps [..., d_model] float32 or bfloat16 tensors to [..., d_out] of the
    same dtype. See the module docstring for the gradient rule."""

    def __init__(self, d_model: int, n_experts: int, k: int, **kwargs):
        super().__init__()
        self._attach(_moe.MoE(d_model=d_model, n_experts=n_experts, k=k, **kwargs))

    @classmethod
    def from_layer(cls, layer) -> "MoE":
        """A module around an existing ``moe.MoE`` (it then shares that layer's weights)."""
        if not isinstance(layer, _moe.MoE):
            raise _moe.Error("layer: expected a moe.MoE")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach(layer)
        return self

    if hasattr(_moe.MoE, "from_pretrained"):
        @classmethod
        def from_pretrained(cls, *args, **kwargs) -> "MoE":
            """``moe.MoE.from_pretrained`` (SPEC §7) as a module, in evaluation mode like
            transformers' models. With the default masters=False the expert matrices are held
            in the chosen precision only: the module evaluates (``.train()`` then forward is an
            error); masters=True keeps trainable fp32 masters."""
            return cls.from_layer(_moe.MoE.from_pretrained(*args, **kwargs)).eval()

    def _attach(self, layer) -> None:
        self.layer = layer            # the moe.MoE this module drives (not a submodule)
        self._handle = _register(layer)
        self._names = list(layer.parameter_names)
        self._d_model = int(layer.d_model)
        self._d_out = int(layer.d_out)
        for n in self._names:
            setattr(self, n, nn.Parameter(torch.from_numpy(layer._buffer(n))))
        self._aux = None  # the last forward's losses (aux_loss, z_loss)
        self._z = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self._d_model:
            raise _moe.Error(f"x: expected shape [..., {self._d_model}] with d_model = "
                             f"{self._d_model}, got {list(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
            raise _moe.Error(f"x: expected a float32 or bfloat16 CPU tensor, got {x.dtype} on "
                             f"{x.device}")
        lead = x.shape[:-1]
        params = [getattr(self, n) for n in self._names]
        x2 = x.reshape(-1, self._d_model)
        if _untraced(x, params):
            y, layer, _ = _run_forward(x2, params, self._handle, self.training)
            self._aux, self._z = float(layer.aux_loss), float(layer.z_loss)  # made on access
        else:
            y, self._aux, self._z, _ = torch.ops.moe.forward(x2, params, self._handle,
                                                             self.training)
        return y.reshape(*lead, self._d_out)

    def _loss(self, name: str):
        v = getattr(self, name)
        if isinstance(v, float):  # a forward autograd did not record: the tensor on demand
            v = torch.tensor(v, dtype=torch.float32)
            setattr(self, name, v)
        return v

    @property
    def aux_loss(self):
        """The last forward's balancing loss, a 0-d float32 tensor (part of the autograd graph
        when autograd recorded that forward); None before the first forward."""
        return self._loss("_aux")

    @property
    def z_loss(self):
        """The last forward's router z-loss, as aux_loss."""
        return self._loss("_z")

    # -- what moe.MoE has besides the parameters ------------------------------------------

    @property
    def stats(self) -> dict:
        """Load statistics of the last forward (``moe.MoE.stats``)."""
        return self.layer.stats

    @property
    def config(self) -> dict:
        return self.layer.config

    @property
    def routing(self):
        return self.layer.routing

    def update_expert_bias(self) -> None:
        """bias_update_rate > 0: move the selection bias from the last training forward's
        load (call once after each optimizer step)."""
        self.layer.update_expert_bias()

    def reset_global_load(self) -> None:
        """aux_loss='global': forget the accumulated loads (call after each optimizer step)."""
        self.layer.reset_global_load()

    def extra_repr(self) -> str:
        c = self.layer.config
        return (f"d_model={c['d_model']}, n_experts={c['n_experts']}, k={c['k']}, "
                f"expert='{c['expert']}', d_ff={c['d_ff']}, d_out={c['d_out']}")

    # -- pickling (torch.save(module), copy.deepcopy) ---------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        # The last forward's losses are non-leaf tensors of an autograd graph, which neither
        # deepcopy nor pickle accepts: the copy keeps their values, detached.
        for name in ("_aux", "_z"):
            if isinstance(state.get(name), torch.Tensor):
                state[name] = state[name].detach().clone()
        state["layer"] = None
        state["_handle"] = None
        state["_layer_config"] = self.layer.config
        state["_layer_step"] = int(self.layer.step)
        if self.layer.config.get("bias_update_rate", 0.0) or self.layer.config.get(
                "selection_bias", False):
            state["_layer_expert_bias"] = self.layer.expert_bias
        return state

    def __setstate__(self, state):
        config = state.pop("_layer_config")
        step = state.pop("_layer_step")
        bias = state.pop("_layer_expert_bias", None)
        for old, new in (("aux_loss", "_aux"), ("z_loss", "_z")):  # pickled before the rename
            if old in state:
                state[new] = state.pop(old)
        self.__dict__.update(state)
        layer = _moe.MoE(**config)
        layer.step = step
        if bias is not None:
            layer.expert_bias = bias
        self.layer = layer
        self._handle = _register(layer)
        for n in self._names:
            p = self._parameters[n]
            buf = torch.from_numpy(layer._buffer(n))
            buf.copy_(p.detach())
            p.data = buf


# ---- the float64 oracle -------------------------------------------------------------------


class _ReferenceF64(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, noise, training, x, *params):
        names = list(layer.parameter_names)
        pd = {n: p.detach().numpy() for n, p in zip(names, params)}
        nz = noise.detach().numpy() if noise is not None else None
        out = layer._reference_f64(x.detach().numpy(), pd, noise=nz, training=training)
        ctx.layer, ctx.names, ctx.noise, ctx.training = layer, names, nz, training
        ctx.save_for_backward(x, *params)
        return (torch.from_numpy(out["y"]), torch.tensor(out["aux_loss"], dtype=torch.float64),
                torch.tensor(out["z_loss"], dtype=torch.float64))

    @staticmethod
    def backward(ctx, dy, daux, dz):
        x, *params = ctx.saved_tensors
        pd = {n: p.detach().numpy() for n, p in zip(ctx.names, params)}
        out = ctx.layer._reference_f64(
            x.detach().numpy(), pd, noise=ctx.noise, training=ctx.training,
            dy=dy.detach().numpy(), aux_scale=float(daux), z_scale=float(dz))
        grads = [torch.from_numpy(out["grads"][n]) for n in ctx.names]
        return (None, None, None, torch.from_numpy(out["dx"]), *grads)


def reference_f64(module: MoE, x: torch.Tensor, params: dict | None = None,
                  noise: torch.Tensor | None = None, training: bool = False):
    """The library's float64 reference twin of ``module``'s layer (same config) as a
    differentiable function: (y, aux_loss, z_loss) for x (T, d_model) float64 and float64
    parameters (default: the module's, converted). The oracle of the gradient checks;
    training with noise needs the noise ε (T, n_experts)."""
    layer = module.layer if isinstance(module, MoE) else module
    names = list(layer.parameter_names)
    if params is None:
        params = {n: torch.from_numpy(layer._buffer(n)).double() for n in names}
    missing = [n for n in names if n not in params]
    if missing:
        raise _moe.Error(f"params: missing {', '.join(missing)}")
    return _ReferenceF64.apply(layer, noise, training, x, *(params[n] for n in names))
