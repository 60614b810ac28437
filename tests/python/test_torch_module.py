"""moe.torch.MoE (SPEC §8): the nn.Module against the plain moe.MoE (same weights: the same
bits in fp32), against autograd of the pure-PyTorch formulas of torch_ref.py, and against the
library's float64 reference twin (gradcheck); the gradient rule of aux_loss / z_loss; the
custom ops (opcheck, torch.compile fullgraph); optimizers, state_dict, torch.save."""
import copy
import gc
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moe
import moe.torch as mt
import torch_ref as R

ROOT = Path(__file__).resolve().parents[2]
close = R.close

# A small layer with every router-side parameter (router bias, learned noise) and z-loss on.
KW = dict(d_model=8, n_experts=4, k=2, d_ff=12, router_init_std=0.5, router_bias=True,
          z_alpha=0.01, aux_alpha=0.05, seed=3)


def make(**over):
    kw = {**KW, **over}
    return mt.MoE(**kw), moe.MoE(**kw)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- parameters: names, shared memory ----------------------------------------------------------


def test_parameters_are_named_like_moe_MoE_and_share_the_layers_memory():
    m, plain = make()
    names = [n for n, _ in m.named_parameters()]
    assert names == list(plain.parameter_names) == ["W_g", "b_g", "W_noise", "W1", "b1", "W2", "b2"]
    for n, p in m.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32
        assert p.data_ptr() == m.layer._buffer_address(n)  # the C++ buffer itself
        np.testing.assert_array_equal(p.detach().numpy(), getattr(plain, n))  # same init
    # Writes either way are seen by the other side, without a copy.
    with torch.no_grad():
        m.W1[0, 0, 0] = 42.0
    assert m.layer.W1[0, 0, 0] == 42.0
    m.layer.b2 = np.full((4, 8), 7.0)
    assert torch.equal(m.b2.detach(), torch.full((4, 8), 7.0))
    # The views keep the layer alive after the module lets go of it.
    w = m.W2
    del m
    gc.collect()
    np.testing.assert_array_equal(w.detach().numpy(), plain.W2)


def test_from_layer_wraps_an_existing_layer_without_copying():
    plain = moe.MoE(**KW)
    m = mt.MoE.from_layer(plain)
    assert m.layer is plain
    plain.W_g = np.ones((8, 4))
    assert torch.equal(m.W_g.detach(), torch.ones(8, 4))
    with pytest.raises(moe.Error, match="layer: expected a moe.MoE"):
        mt.MoE.from_layer(object())


def test_keywords_pass_through_and_errors_name_the_field():
    m = mt.MoE(d_model=6, n_experts=3, k=1, expert="swiglu", d_ff=5, capacity_factor=1.5,
               noise="none", router="softmax_topk")
    assert m.config["expert"] == "swiglu" and m.config["capacity_factor"] == 1.5
    assert [n for n, _ in m.named_parameters()] == ["W_g", "W1", "W2", "W3"]
    with pytest.raises(ValueError, match="n_experts"):
        mt.MoE(d_model=4, n_experts=0, k=1)
    with pytest.raises(moe.Error, match=r"x: expected shape \[\.\.\., 6\]"):
        m(torch.zeros(2, 5))
    with pytest.raises(moe.Error, match="x: expected a float32 or bfloat16"):
        m(torch.zeros(2, 6, dtype=torch.float64))
    m.double()
    with pytest.raises(moe.Error, match="W_g: moe.torch.MoE keeps float32 parameters"):
        m(torch.zeros(2, 6))


# ---- against the plain layer: the same bits ------------------------------------------------


def test_forward_and_backward_are_the_plain_layers_bit_for_bit():
    m, plain = make(capacity_factor=1.0)
    for step in range(3):  # training draws fresh noise per forward on both sides alike
        x = randn(3, 7, 8, seed=step)
        dy = randn(3, 7, 8, seed=100 + step)
        y = m(x.requires_grad_(True))
        assert y.shape == (3, 7, 8) and y.dtype == torch.float32
        yp = plain.forward(x.detach().reshape(21, 8).numpy())
        np.testing.assert_array_equal(y.detach().reshape(21, 8).numpy(), yp)
        assert m.aux_loss.item() == np.float32(plain.aux_loss)
        assert m.z_loss.item() == np.float32(plain.z_loss)
        assert m.stats == plain.stats
        # The objective moe.MoE.backward differentiates: <y, dy> + aux_loss + z_loss.
        m.zero_grad()
        ((y * dy).sum() + m.aux_loss + m.z_loss).backward()
        plain.zero_grad()
        dxp = plain.backward(dy.reshape(21, 8).numpy())
        np.testing.assert_array_equal(x.grad.reshape(21, 8).numpy(), dxp)
        for n, p in m.named_parameters():
            np.testing.assert_array_equal(p.grad.numpy(), plain.grads[n], err_msg=n)
    # Evaluation mode is the evaluation forward: no noise.
    m.eval()
    x = randn(5, 8, seed=9)
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), plain.forward(x.numpy(), training=False))
    np.testing.assert_array_equal(m.routing.noisy_logits, m.routing.logits)


def test_a_forward_autograd_does_not_record_skips_the_op_and_is_the_same_forward():
    # Under no_grad, inference_mode, or when nothing requires grad, MoE.forward calls the
    # layer without the moe::forward op (a decode step's dispatch); it must be the same
    # forward: output, losses, statistics and the training noise counter.
    calls = []
    real = mt._run_forward

    def counting(*a):
        calls.append(sys._getframe(1).f_code.co_name)  # "forward": MoE.forward; "_forward": the op
        return real(*a)

    for ctx, grad in ((torch.no_grad, True), (torch.inference_mode, True),
                      (torch.enable_grad, False)):
        m, plain = make(capacity_factor=1.0)
        if not grad:
            m.requires_grad_(False)
        for step in range(3):  # training: fresh noise per forward, on both sides alike
            x = randn(3, 5, 8, seed=step).to(torch.bfloat16)
            mt._run_forward = counting
            try:
                calls.clear()
                with ctx():
                    assert mt._untraced(x, list(m.parameters()))
                    y = m(x)
            finally:
                mt._run_forward = real
            assert calls == ["forward"]
            assert m.layer.step == step + 1
            yp = plain.forward(x.float().reshape(15, 8).numpy())
            assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 8)
            assert torch.equal(y, torch.from_numpy(yp).to(torch.bfloat16).reshape(3, 5, 8))
            assert m.aux_loss.dtype == torch.float32 and m.aux_loss.dim() == 0
            assert m.aux_loss.item() == np.float32(plain.aux_loss)
            assert m.z_loss.item() == np.float32(plain.z_loss)
            assert m.aux_loss is m.aux_loss  # made once, on demand
            assert m.stats == plain.stats
        # After such a forward the module still pickles and copies.
        other = copy.deepcopy(m)
        assert other.aux_loss.item() == m.aux_loss.item()


def test_the_op_runs_when_autograd_or_a_tracer_is_watching():
    m, _ = make(noise="none")
    params = list(m.parameters())
    x = randn(4, 8, seed=1)
    assert not mt._untraced(x, params)  # grad mode on, parameters require grad
    assert not mt._untraced(x.clone().requires_grad_(True), [p.detach() for p in params])
    with torch.no_grad():
        assert mt._untraced(x, params)

        class Watch(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Watch():
            assert not mt._untraced(x, params)
        with torch.device("cpu"):  # a torch-function mode
            assert not mt._untraced(x, params)
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as fake:
            assert not mt._untraced(fake.from_tensor(x), params)
        # The op under a dispatch mode computes the same forward as the direct call.
        direct = m(x)
        with Watch():
            watched = m(x)
    assert torch.equal(direct, watched)


def test_one_token_and_empty_batches():
    m, plain = make(noise="none")
    y = m(randn(8, seed=1))
    assert y.shape == (8,)
    np.testing.assert_array_equal(y.detach().numpy(),
                                  plain.forward(randn(8, seed=1).numpy()[None])[0])
    assert m(torch.zeros(0, 3, 8)).shape == (0, 3, 8)


def test_bf16_inputs_give_bf16_outputs():
    m, plain = make(noise="none")
    x = randn(4, 8, seed=2).to(torch.bfloat16).requires_grad_(True)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 8)
    yp = plain.forward(x.detach().float().numpy())
    assert torch.equal(y.detach(), torch.from_numpy(yp).to(torch.bfloat16))
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape


def test_precision_bf16_is_the_plain_layers_and_follows_optimizer_and_loads():
    """precision="bf16": the same bits as moe.MoE(precision="bf16"), and the layer's bf16
    copies follow the weights an optimizer step or load_state_dict writes in place."""
    m, plain = make(precision="bf16", noise="none")
    assert m.config["precision"] == "bf16"
    x = randn(9, 8, seed=30)
    y = m(x.requires_grad_(True))
    np.testing.assert_array_equal(y.detach().numpy(), plain.forward(x.detach().numpy()))
    (y.square().sum() + m.aux_loss + m.z_loss).backward()
    plain.zero_grad()
    plain.backward(2 * plain.forward(x.detach().numpy()))
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), plain.grads[n], err_msg=n)

    def same_as_plain_with_the_modules_weights():
        for n, p in m.named_parameters():
            setattr(plain, n, p.detach().numpy())
        with torch.no_grad():
            np.testing.assert_array_equal(m(x.detach()).numpy(),
                                          plain.forward(x.detach().numpy()))

    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    opt.step()  # in place, after a backward
    same_as_plain_with_the_modules_weights()
    other, _ = make(precision="bf16", noise="none", seed=77)
    m.load_state_dict(other.state_dict())  # in place, no backward in between
    same_as_plain_with_the_modules_weights()
    with torch.no_grad():  # a plain in-place write
        m.W1.mul_(-1.0)
    same_as_plain_with_the_modules_weights()


# ---- against autograd of the pure-PyTorch formulas ----------------------------------------


def torch_ref_of(m, x, training=True):
    """The float64 formulas of torch_ref.py on m's weights and on the noise m drew."""
    cfg = {k: v for k, v in m.config.items()}
    P = {n: p.detach().double().clone().requires_grad_(True) for n, p in m.named_parameters()}
    xt = x.detach().double().clone().requires_grad_(True)
    eps = m.routing.eps
    ref = R.moe_forward(P, xt, cfg, eps=None if eps is None else R.t64(eps), training=training)
    return ref, P, xt


@pytest.mark.parametrize("coef", [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (0.5, 3.0)],
                         ids=["aux+z", "task-only", "aux-only", "0.5aux+3z"])
def test_gradients_are_those_of_the_objective_differentiated(coef):
    """The gradient rule: each of aux_loss and z_loss counts as often as the objective has
    it (the library's backward always adds both once; the module rescales)."""
    a, b = coef
    m, _ = make()
    x = randn(16, 8, seed=5).requires_grad_(True)
    dy = randn(16, 8, seed=6)
    y = m(x)
    ref, P, xt = torch_ref_of(m, x)
    close(y.detach(), ref["y"].detach(), rtol=1e-4, atol=1e-5, what="y")
    ((y * dy).sum() + a * m.aux_loss + b * m.z_loss).backward()
    ((ref["y"] * dy.double()).sum() + a * ref["aux_loss"] + b * ref["z_loss"]).backward()
    assert ref["z_loss"].item() > 0 and ref["aux_loss"].item() > 0
    close(x.grad, xt.grad, rtol=1e-4, atol=2e-5 * (1 + xt.grad.abs().max().item()), what="dx")
    for n, p in m.named_parameters():
        g = P[n].grad
        close(p.grad, g, rtol=1e-4, atol=2e-5 * (1 + g.abs().max().item()), what=f"grad {n}")


def test_aux_loss_alone_is_differentiable():
    m, _ = make()
    x = randn(16, 8, seed=7).requires_grad_(True)
    m(x)
    ref, P, xt = torch_ref_of(m, x)
    gx, gW = torch.autograd.grad(m.aux_loss, [x, m.W_g])
    rx, rW = torch.autograd.grad(ref["aux_loss"], [xt, P["W_g"]])
    close(gx, rx, rtol=1e-4, atol=1e-7, what="d aux / dx")
    close(gW, rW, rtol=1e-4, atol=1e-7, what="d aux / dW_g")
    assert rW.abs().max() > 0


def test_gradients_accumulate_and_zero_grad_resets():
    m, _ = make(noise="none")
    x = randn(6, 8, seed=8)

    def loss(m, x):
        return m(x).sum() + m.aux_loss + m.z_loss
    loss(m, x).backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters()}
    # The gradients moved out of the layer (its buffers start again from zero).
    assert all(g1[n].abs().sum() > 0 for n in ("W_g", "W1", "W2"))
    assert all(not g.any() for g in m.layer.grads.values())
    loss(m, x).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, 2 * g1[n], rtol=0, atol=0)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    loss(m, x).backward()
    for n, p in m.named_parameters():
        assert torch.equal(p.grad, g1[n])


def test_called_twice_before_backward_recomputes_the_first_call():
    """Two calls (two micro-batches, or one module shared by two places) then one backward:
    each call's gradient is its own, as two separate forward/backward pairs give."""
    m, _ = make()
    x1, x2 = randn(5, 8, seed=10), randn(7, 8, seed=11)
    (m(x1).square().sum() + m(x2).sum() + m.aux_loss).backward()
    both = {n: p.grad.clone() for n, p in m.named_parameters()}

    ref, _ = make()  # the same seed and the same noise steps, one call at a time
    (ref(x1).square().sum() + ref.aux_loss * 0).backward()
    (ref(x2).sum() + ref.aux_loss).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(both[n], p.grad, rtol=1e-6, atol=1e-7, msg=n)


# ---- the float64 oracle: gradcheck -------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-noise"])
def test_gradcheck_float64_reference(training):
    """torch.autograd.gradcheck of the library's float64 twin (layer/layer_ref.hpp) against
    finite differences, every parameter and x, with both losses in the objective."""
    m = mt.MoE(d_model=4, n_experts=3, k=2, d_ff=5, router_init_std=1.0, router_bias=True,
               z_alpha=0.1, aux_alpha=0.3, seed=4)
    x = randn(6, 4, seed=12, dtype=torch.float64).requires_grad_(True)
    P = {n: p.detach().double().clone().requires_grad_(True) for n, p in m.named_parameters()}
    noise = randn(6, 3, seed=13, dtype=torch.float64) if training else None
    names = list(P)
    # Central differences of step 1e-6 must not cross the top-k kink: the case's k-th and
    # (k+1)-th noisy logits are further apart than that.
    _, H, _ = R.layer_logits(P, x.detach(), m.config, eps=noise, training=training)
    assert R.topk_margin(H, 2).min() > 1e-3

    def f(x, *ps):
        y, aux, z = mt.reference_f64(m, x, dict(zip(names, ps)), noise=noise, training=training)
        return y, aux, 2 * z  # unequal coefficients reach the twin's loss scales
    assert torch.autograd.gradcheck(f, (x, *P.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_module_gradients_match_the_float64_reference():
    m, _ = make()
    x = randn(12, 8, seed=14).requires_grad_(True)
    y = m(x)
    noise = torch.from_numpy(m.routing.eps).double()
    P = {n: p.detach().double().clone().requires_grad_(True) for n, p in m.named_parameters()}
    xd = x.detach().double().requires_grad_(True)
    yr, aux, z = mt.reference_f64(m, xd, P, noise=noise, training=True)
    close(y.detach(), yr.detach(), rtol=1e-4, atol=1e-5, what="y")
    close(m.aux_loss.detach(), aux.detach(), rtol=1e-5, atol=1e-8, what="aux_loss")
    dy = randn(12, 8, seed=15)
    ((y * dy).sum() + m.aux_loss).backward()
    ((yr * dy.double()).sum() + aux).backward()
    close(x.grad, xd.grad, rtol=1e-4, atol=2e-5 * (1 + xd.grad.abs().max().item()), what="dx")
    for n, p in m.named_parameters():
        g = P[n].grad
        close(p.grad, g, rtol=1e-4, atol=2e-5 * (1 + g.abs().max().item()), what=f"grad {n}")


def test_float64_reference_refuses_what_it_does_not_model():
    m = mt.MoE(d_model=4, n_experts=3, k=2, router="expert_choice", noise="none")
    with pytest.raises(moe.Error, match="router"):
        mt.reference_f64(m, torch.zeros(2, 4, dtype=torch.float64))
    m = mt.MoE(d_model=4, n_experts=3, k=2)
    with pytest.raises(moe.Error, match="noise"):
        mt.reference_f64(m, torch.zeros(2, 4, dtype=torch.float64), training=True)


# ---- custom ops: opcheck and torch.compile ----------------------------------------------


def test_opcheck_forward_and_backward_ops():
    m, _ = make()
    m.eval()  # opcheck runs the op several times and compares: the evaluation forward repeats
    params = list(m.parameters())
    x = randn(5, 8, seed=16).requires_grad_(True)
    torch.library.opcheck(torch.ops.moe.forward.default, (x, params, m._handle, False))
    y, aux, z, state = torch.ops.moe.forward(x.detach(), params, m._handle, False)
    torch.library.opcheck(
        torch.ops.moe.backward.default,
        (randn(5, 8, seed=17), torch.tensor(1.0), torch.tensor(0.5), x.detach(), state,
         [p.detach() for p in params], m._handle),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.moe = mt.MoE(**KW)

    def forward(self, x):
        h = self.moe(torch.tanh(self.inp(x)))
        return h.square().mean() + self.moe.aux_loss + self.moe.z_loss


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    eager = Block()
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, fullgraph=True, backend=backend)
    for step in range(2):
        x = randn(2, 6, 8, seed=20 + step)
        le, lc = eager(x), run(x)
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
        le.backward()
        lc.backward()
        for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=n)
        assert compiled.moe.aux_loss is not None
        torch.testing.assert_close(compiled.moe.aux_loss, eager.moe.aux_loss)


# ---- optimizers, state_dict, torch.save ------------------------------------------------


def test_torch_optimizer_updates_are_what_the_layer_computes_with():
    m, plain = make()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = randn(10, 8, seed=21)
    for _ in range(3):
        opt.zero_grad()
        (m(x).square().mean() + m.aux_loss + m.z_loss).backward()
        opt.step()
    # The plain layer given the module's weights computes what the module does.
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(m.layer.parameters()[n], p.detach().numpy())
        setattr(plain, n, p.detach().numpy())
    assert not np.array_equal(plain.W1, moe.MoE(**KW).W1)  # the steps changed the weights
    m.eval()
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), plain.forward(x.numpy(), training=False))


def test_state_dict_round_trip_and_load_with_assign():
    a, _ = make()
    b, _ = make(seed=99)
    sd = a.state_dict()
    assert list(sd) == [n for n, _ in a.named_parameters()]
    b.load_state_dict(sd)
    x = randn(4, 8, seed=22)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    for n, p in b.named_parameters():  # still the C++ buffers: copied in place
        assert p.data_ptr() == b.layer._buffer_address(n)
    # assign=True replaces the Parameters: the layer copies them in before computing.
    c, _ = make(seed=98)
    c.load_state_dict({n: t.clone() for n, t in sd.items()}, assign=True)
    c.eval()
    with torch.no_grad():
        assert torch.equal(c(x), a(x))


def test_torch_save_and_load_module_and_state_dict(tmp_path):
    m, _ = make()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(randn(6, 8, seed=23)).sum().backward()
    opt.step()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.save(m, tmp_path / "m.pt")
    x = randn(3, 8, seed=24)
    m.eval()
    with torch.no_grad():
        want = m(x)
    fresh, _ = make(seed=50)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    dup = copy.deepcopy(m)
    for other in (fresh, loaded, dup):
        other.eval()
        for n, p in other.named_parameters():
            assert p.data_ptr() == other.layer._buffer_address(n)
        with torch.no_grad():
            assert torch.equal(other(x), want)
    assert loaded.layer is not m.layer and dup.layer is not m.layer


def test_deepcopy_and_torch_save_after_a_forward_with_gradients(tmp_path):
    """Regression (issue 22): after a forward with autograd on, aux_loss and z_loss are
    non-leaf tensors; copy.deepcopy and torch.save used to refuse the module ("Only Tensors
    created explicitly by the user (graph leaves) support the deepcopy protocol")."""
    m, _ = make()
    x = randn(6, 8, seed=31)
    loss = m(x).square().mean() + m.aux_loss + m.z_loss
    assert m.aux_loss.grad_fn is not None
    dup = copy.deepcopy(m)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (dup, loaded):
        assert other.aux_loss.grad_fn is None and float(other.aux_loss) == float(m.aux_loss)
        assert other.layer is not m.layer
    loss.backward()                      # the original's graph is untouched by the copies
    m.eval(); dup.eval()
    with torch.no_grad():
        assert torch.equal(dup(x), m(x))


# ---- the README's "From PyTorch" example runs as written ------------------------------------


def test_readme_from_pytorch_example_runs(monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("### From PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    exec(compile(code, "README.md (From PyTorch)", "exec"), {})
    assert out.getvalue().strip()
