"""moe.SGD / moe.Adam / moe.AdamW / moe.clip_grad_norm against torch.optim on the gradients
of a real layer, step by step."""
import numpy as np
import pytest
import torch

import moe
import torch_ref as R


def make_layer(seed=0, **kw):
    args = dict(d_model=6, n_experts=4, k=2, d_ff=8, noise="none", router_init_std=0.5,
                aux_alpha=0.05, z_alpha=0.01, seed=seed)
    args.update(kw)
    return moe.MoE(**args)


def run_against_torch(make_opt, make_torch_opt, steps=5, **layer_kw):
    rng = np.random.default_rng(3)
    m = make_layer(**layer_kw)
    x = rng.normal(size=(40, 6))
    dy = rng.normal(size=(40, 6))
    params = {n: R.t64(v).requires_grad_(False) for n, v in m.parameters().items()}
    opt = make_opt(m)
    topt = make_torch_opt(list(params.values()))
    for step in range(steps):
        opt.zero_grad()
        m.forward(x)
        m.backward(dy)
        g = m.grads
        assert any(np.any(v) for v in g.values())
        for n, p in params.items():
            p.grad = R.t64(g[n])
        topt.step()
        opt.step()
        now = m.parameters()
        for n, p in params.items():
            ref = p.numpy()
            # Updates are computed in double and stored in float32: a few ulps per step.
            np.testing.assert_allclose(now[n], ref, rtol=2e-6 * (step + 1),
                                       atol=1e-7 * (step + 1), err_msg=f"{n} after step {step + 1}")
    assert opt.step_count == steps
    moved = sum(np.count_nonzero(m.parameters()[n] != make_layer(**layer_kw).parameters()[n])
                for n in params)
    assert moved > 0.5 * sum(p.numel() for p in params.values())  # the steps really moved
    return m, opt


@pytest.mark.parametrize("momentum, nesterov, dampening, wd", [
    (0.0, False, 0.0, 0.0), (0.9, False, 0.0, 0.0), (0.9, True, 0.0, 0.01), (0.8, False, 0.3, 0.05)])
def test_sgd_matches_torch(momentum, nesterov, dampening, wd):
    run_against_torch(
        lambda m: moe.SGD(m, lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=wd),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, dampening=dampening,
                                   nesterov=nesterov, weight_decay=wd))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_torch(wd):
    run_against_torch(lambda m: moe.Adam(m, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd),
                      lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                                  weight_decay=wd))


@pytest.mark.parametrize("wd", [0.01, 0.2])
def test_adamw_matches_torch(wd):
    m, opt = run_against_torch(lambda m: moe.AdamW(m, lr=0.01, weight_decay=wd),
                               lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=wd))
    assert opt.kind == "adamw"


def test_optimizer_over_two_layers_and_lr_schedule():
    a, b = make_layer(1), make_layer(2)
    opt = moe.SGD([a, b], lr=0.1)
    assert opt.param_names[0] == "0.W_g" and "1.W1" in opt.param_names
    x = np.random.default_rng(0).normal(size=(10, 6))
    before = (a.W1.copy(), b.W1.copy())
    for layer in (a, b):
        layer.forward(x)
        layer.backward(np.ones((10, 6)))
    ga, gb = a.grads["W1"], b.grads["W1"]
    opt.lr = 0.05
    assert opt.lr == 0.05
    opt.step()
    np.testing.assert_allclose(a.W1, before[0] - 0.05 * ga, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b.W1, before[1] - 0.05 * gb, rtol=1e-6, atol=1e-7)
    opt.zero_grad()
    assert not any(np.any(g) for g in a.grads.values())


def test_optimizer_keeps_its_layer_alive():
    opt = moe.Adam(make_layer())  # the layer has no other reference
    opt.step()
    assert opt.step_count == 1


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    m = make_layer(4)
    rng = np.random.default_rng(1)
    m.forward(rng.normal(size=(30, 6)))
    m.backward(rng.normal(size=(30, 6)))
    g = m.grads
    ps = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in g.values()]
    for p, v in zip(ps, g.values()):
        p.grad = R.t64(v)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ps, max_norm))
    norm = moe.clip_grad_norm(m, max_norm)
    assert norm == pytest.approx(ref_norm, rel=1e-6)
    for p, (n, v) in zip(ps, m.grads.items()):
        np.testing.assert_allclose(v, p.grad.numpy(), rtol=1e-6, atol=1e-9, err_msg=n)
    if max_norm < ref_norm:
        after = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in m.grads.values()))
        assert after == pytest.approx(max_norm, rel=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda: moe.SGD(make_layer(), lr=-1.0), "lr"),
    (lambda: moe.SGD(make_layer(), lr=0.1, nesterov=True), "nesterov"),
    (lambda: moe.Adam(make_layer(), betas=(1.0, 0.999)), "beta1"),
    (lambda: moe.AdamW(make_layer(), eps=-1.0), "eps"),
    (lambda: moe.SGD("not a layer"), "params"),
    (lambda: moe.SGD([]), "params"),
    (lambda: moe.clip_grad_norm(make_layer(), 0.0), "max_norm"),
])
def test_optimizer_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
