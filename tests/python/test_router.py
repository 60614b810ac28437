"""moe.noisy_top_k_gating and moe.route (SPEC §1, §5): the reference examples, gating
properties, validation, and a PyTorch cross-check on random inputs."""
import numpy as np
import pytest
import torch

import moe
import torch_ref as R

F32_EPS = float(np.finfo(np.float32).eps)

# (X, W_g, W_noise, N, k) of the reference examples.
EX1 = ([[1, 2]], np.eye(2), [[0.5, 0.5], [0.5, 0.5]], [[1, -1]], 2)
EX2 = ([[1, 0], [0, 1]], [[1, 0.5, 0], [0, 0.5, 1]], np.full((2, 3), 0.1),
       [[0.5, -0.5, 0.2], [0.1, 0, -0.1]], 2)
EX3 = ([[1, 1]], [[2, 1, 0.5], [0, 1, 0.5]], np.full((2, 3), 0.1), np.zeros((1, 3)), 1)


@pytest.mark.parametrize("example, scale, expected", [
    (EX1, "linear", [[0.881, 0.119]]),
    (EX2, "linear", [[0.646, 0.354, 0.0], [0.0, 0.38, 0.62]]),
    (EX3, "linear", [[0.0, 1.0, 0.0]]),
    (EX1, "softplus", [[0.917, 0.083]]),
    (EX2, "softplus", [[0.773, 0.0, 0.227], [0.0, 0.395, 0.605]]),
])
def test_reference_examples(example, scale, expected):
    X, W_g, W_noise, N, k = example
    r = moe.route(X, W_g, k, W_noise=W_noise, noise=N, noise_scale=scale)
    np.testing.assert_array_equal(np.round(r.gates, 3), np.asarray(expected, dtype=np.float32))
    assert r.gates.dtype == np.float32 and r.indices.dtype == np.int32


def test_tie_goes_to_higher_index_by_default_and_lower_on_request():
    X, W_g, W_noise, N, k = EX3  # logits [2, 2, 1]: experts 0 and 1 tie
    assert moe.route(X, W_g, k, W_noise=W_noise, noise=N).indices.tolist() == [[1]]
    assert moe.route(X, W_g, k, W_noise=W_noise, noise=N, tie_break="low").indices.tolist() == [[0]]
    g = moe.noisy_top_k_gating([[3.0, 5.0, 5.0, 5.0]], 2, training=False)
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[0, 2] > 0 and g[0, 3] > 0


def test_route_outputs_are_consistent():
    X, W_g, W_noise, N, k = EX2
    r = moe.route(X, W_g, k, W_noise=W_noise, noise=N, noise_scale="linear")
    T, E = r.gates.shape
    assert r.indices.shape == (T, k) and r.weights.shape == (T, k)
    assert r.probs.shape == (T, E) and r.noisy_logits.shape == (T, E)
    for t in range(T):
        np.testing.assert_array_equal(r.gates[t, r.indices[t]], r.weights[t])
        assert np.all(np.diff(r.noisy_logits[t, r.indices[t]]) <= 0)  # best first
    np.testing.assert_allclose(r.probs.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(r.noisy_logits - r.logits, (np.asarray(X) @ W_noise) * N, atol=1e-7)


# ---- noisy top-k gating -------------------------------------------------------------------


def softmax_top_k(logits, k):
    out = np.zeros_like(logits, dtype=np.float64)
    for t, row in enumerate(logits):
        idx = np.argsort(-row, kind="stable")[:k]
        w = np.exp(row[idx] - row[idx].max())
        out[t, idx] = w / w.sum()
    return out


def test_gating_at_evaluation_is_top_k_softmax(rng):
    logits = rng.normal(size=(50, 9))
    for k in (1, 3, 9):
        g = moe.noisy_top_k_gating(logits, k, noise_stddev=2.0, training=False, seed=5)
        np.testing.assert_allclose(g, softmax_top_k(logits, k), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_gating_in_training_keeps_exactly_k_summing_to_one(rng, k):
    logits = rng.normal(size=(200, 8))
    g = moe.noisy_top_k_gating(logits, k, noise_stddev=1.0, training=True, seed=1)
    assert g.shape == logits.shape
    assert np.all((g > 0).sum(axis=1) == k)
    np.testing.assert_allclose(g.sum(axis=1), 1, rtol=1e-6)
    assert np.all(g >= 0)


def test_gating_noise_is_reproducible_and_seed_dependent(rng):
    logits = rng.normal(size=(100, 6))
    a = moe.noisy_top_k_gating(logits, 2, seed=11)
    b = moe.noisy_top_k_gating(logits, 2, seed=11)
    c = moe.noisy_top_k_gating(logits, 2, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # σ = 0 in training is plain top-k softmax; noise does change the selection otherwise.
    np.testing.assert_array_equal(moe.noisy_top_k_gating(logits, 2, noise_stddev=0.0),
                                  moe.noisy_top_k_gating(logits, 2, training=False))
    assert not np.array_equal(a > 0, moe.noisy_top_k_gating(logits, 2, training=False) > 0)


def test_gating_1d_and_any_dtype_or_layout(rng):
    logits = rng.normal(size=(7, 5))
    ref = moe.noisy_top_k_gating(logits.astype(np.float32), 2, training=False)
    g1 = moe.noisy_top_k_gating(logits[3], 2, training=False)
    assert g1.shape == (5,)
    np.testing.assert_array_equal(g1, ref[3])
    wide = np.zeros((5, 14))
    wide[:, ::2] = logits.T
    strided = wide[:, ::2].T  # non-contiguous view of the same values
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(moe.noisy_top_k_gating(strided, 2, training=False), ref)
    np.testing.assert_array_equal(
        moe.noisy_top_k_gating(logits.astype(np.float32).tolist(), 2, training=False), ref)


def test_generated_noise_is_standard_normal():
    # Learned linear scale with x·W_noise = 1 exposes ε itself: H − h = ε.
    T, E = 4000, 16
    X = np.ones((T, 1))
    r = moe.route(X, np.zeros((1, E)), 2, W_noise=np.ones((1, E)), noise_scale="linear", seed=3)
    eps = (r.noisy_logits - r.logits).astype(np.float64).ravel()
    np.testing.assert_array_equal(eps, r.eps.ravel())
    n = eps.size
    assert abs(eps.mean()) < 5 / np.sqrt(n)
    assert abs(eps.std() - 1) < 5 * np.sqrt(0.5 / n)
    assert abs(np.mean(eps ** 4) - 3) < 0.3  # normal, not uniform (1.8)
    # Different tokens and experts get different draws; another seed gives other draws.
    assert len(np.unique(eps)) > 0.99 * n
    r2 = moe.route(X, np.zeros((1, E)), 2, W_noise=np.ones((1, E)), noise_scale="linear", seed=4)
    assert not np.array_equal(r.eps, r2.eps)


def test_no_noise_at_evaluation_and_without_W_noise(rng):
    X, W_g, W_noise = rng.normal(size=(20, 4)), rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    ev = moe.route(X, W_g, 2, W_noise=W_noise, training=False)
    plain = moe.route(X, W_g, 2)
    np.testing.assert_array_equal(ev.noisy_logits, ev.logits)
    np.testing.assert_array_equal(ev.gates, plain.gates)
    assert ev.eps is None and plain.eps is None
    tr = moe.route(X, W_g, 2, W_noise=W_noise, training=True)
    assert not np.array_equal(tr.noisy_logits, tr.logits)


def test_bit_identical_with_one_and_two_threads(rng, threads):
    X, W_g, W_noise = rng.normal(size=(301, 33)), rng.normal(size=(33, 17)), rng.normal(size=(33, 17))
    out = []
    for n in (1, 2):
        moe.set_num_threads(n)
        assert moe.get_num_threads() == n
        r = moe.route(X, W_g, 3, W_noise=W_noise, seed=9)
        out.append((r.gates, r.noisy_logits, r.indices))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


# ---- PyTorch cross-check ---------------------------------------------------------------------


@pytest.mark.parametrize("T, d, E, k", [(1, 3, 1, 1), (64, 16, 8, 2), (97, 24, 13, 3),
                                        (40, 8, 5, 5), (33, 10, 64, 8), (20, 6, 1000, 4)])
@pytest.mark.parametrize("noise", ["none", "softplus", "linear", "generated"])
def test_route_matches_torch(rng, T, d, E, k, noise):
    X = rng.normal(size=(T, d)).astype(np.float32)
    W_g = rng.normal(scale=0.5, size=(d, E)).astype(np.float32)
    kw, eps = {}, None
    if noise != "none":
        kw["W_noise"] = rng.normal(scale=0.5, size=(d, E)).astype(np.float32)
        kw["noise_scale"] = "linear" if noise == "linear" else "softplus"
        if noise != "generated":
            eps = rng.normal(size=(T, E)).astype(np.float32)
            kw["noise"] = eps
    r = moe.route(X, W_g, k, seed=21, **kw)
    if noise == "generated":
        eps = r.eps  # the generator is libmoe's; the formula around it is checked
    ref = R.route(R.t64(X), R.t64(W_g), k, W_noise=None if noise == "none" else R.t64(kw["W_noise"]),
                  eps=None if eps is None else R.t64(eps), noise_scale=kw.get("noise_scale", "softplus"))

    # float32 against float64: |err| ≤ atol + rtol·|ref| with rtol a few hundred ulps
    # (d-term dot products), atol scaled by the magnitude of the summands.
    scale = np.abs(X) @ (np.abs(W_g) + (np.abs(kw["W_noise"]) * (np.abs(eps).max() + 1) if eps is not None else 0))
    tol_h = 8 * d * F32_EPS * scale
    np.testing.assert_allclose(r.logits, ref["logits"].numpy(), rtol=0, atol=tol_h.max())
    np.testing.assert_allclose(r.noisy_logits, ref["noisy"].numpy(), rtol=0, atol=tol_h.max())
    np.testing.assert_allclose(r.probs, ref["probs"].numpy(), rtol=1e-4, atol=1e-6 + 2 * tol_h.max())

    # Selection and gates where the ranking is unambiguous in float32.
    margin = R.topk_margin(ref["noisy"], k).numpy()
    clear = margin > 4 * tol_h.max(axis=-1, keepdims=False) + 1e-6
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(r.indices[clear], ref["indices"].numpy()[clear])
    np.testing.assert_allclose(r.weights[clear], ref["weights"].numpy()[clear],
                               rtol=1e-4, atol=1e-6 + 2 * tol_h.max())
    np.testing.assert_allclose(r.gates[clear], ref["gates"].numpy()[clear],
                               rtol=1e-4, atol=1e-6 + 2 * tol_h.max())
    assert (r.gates[clear] > 0).sum() == clear.sum() * k  # zero-trust: k live gates per row


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: moe.route(np.ones((2, 3)), np.ones((4, 5)), 1), "W_g"),
    (lambda: moe.route(np.ones(3), np.ones((3, 5)), 1), "X"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 0), "k"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 6), "k"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 1, W_noise=np.ones((3, 4))), "W_noise"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 1, W_noise=np.ones((3, 5)),
                       noise=np.ones((3, 5))), "noise"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 1, noise=np.ones((2, 5))), "noise"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 1, noise_scale="cubic"), "noise_scale"),
    (lambda: moe.route(np.ones((2, 3)), np.ones((3, 5)), 1, tie_break="random"), "tie_break"),
    (lambda: moe.route(np.array([[1, 2, np.inf], [0, 0, 0]]), np.ones((3, 5)), 1), "token 0"),
    (lambda: moe.route([["a", "b"]], np.ones((2, 5)), 1), "X"),
    (lambda: moe.route(None, np.ones((2, 5)), 1), "X"),
    (lambda: moe.noisy_top_k_gating(np.ones((2, 3)), 4), "k"),
    (lambda: moe.noisy_top_k_gating(np.ones((2, 3, 4)), 1), "logits"),
    (lambda: moe.noisy_top_k_gating(np.ones((2, 3)), 1, noise_stddev=-1.0), "noise_stddev"),
    (lambda: moe.noisy_top_k_gating([[0, 1, 2], [0, np.nan, 1]], 1), "token 1"),
    (lambda: moe.noisy_top_k_gating(np.ones((2, 3)), 1, seed=-3), "seed"),
    (lambda: moe.set_num_threads(0), "threads"),
])
def test_errors_are_value_errors_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_error_type_is_exported_and_a_value_error():
    assert issubclass(moe.Error, ValueError)
    with pytest.raises(moe.Error):
        moe.route(np.ones((2, 3)), np.ones((3, 5)), 9)


def test_empty_batch():
    r = moe.route(np.zeros((0, 3)), np.ones((3, 5)), 2)
    assert r.gates.shape == (0, 5) and r.indices.shape == (0, 2)
    assert moe.noisy_top_k_gating(np.zeros((0, 4)), 2).shape == (0, 4)
