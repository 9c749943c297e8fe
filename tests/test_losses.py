"""prefopt.losses: the DPO (sigmoid) loss against hand-computed values, its registry and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt import losses


def _log_sigmoid(x: float) -> float:
    # log σ(x) = −log(1 + e^(−x)), written two ways so that neither side overflows
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _by_hand(lc, lr, rc, rr, beta, eps=0.0):
    h = (lc - rc) - (lr - rr)
    return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)


CASES = [
    # logp_c, logp_r, ref_logp_c, ref_logp_r
    (-12.0, -15.0, -13.0, -14.0),  # h = 1 - (-1) = 2
    (-30.5, -20.25, -28.0, -25.0),  # h = -2.5 - 4.75 = -7.25
    (-5.0, -5.0, -5.0, -5.0),  # h = 0 → log 2
]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_matches_hand_computed(beta):
    cols = list(zip(*CASES))
    got = losses.sigmoid(*(_t(c) for c in cols), beta=beta)
    assert got.dtype == torch.float64 and got.shape == (len(CASES),)
    for g, case in zip(got.tolist(), CASES):
        assert g == pytest.approx(_by_hand(*case, beta), rel=1e-12, abs=1e-12)
    # explicit anchors: −log σ(0) = log 2; −log σ(0.1·2) = log(1 + e^−0.2)
    assert got[2].item() == pytest.approx(math.log(2.0), rel=1e-12)
    if beta == 0.1:
        assert got[0].item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)
        assert got[1].item() == pytest.approx(math.log(1 + math.exp(0.725)), rel=1e-12)


def test_sigmoid_label_smoothing():
    eps, beta = 0.1, 0.5
    cols = list(zip(*CASES))
    got = losses.sigmoid(*(_t(c) for c in cols), beta=beta, label_smoothing=eps)
    for g, case in zip(got.tolist(), CASES):
        assert g == pytest.approx(_by_hand(*case, beta, eps), rel=1e-12, abs=1e-12)
    # case 0: h = 2, βh = 1:  −0.9·log σ(1) − 0.1·log σ(−1)
    expected = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert got[0].item() == pytest.approx(expected, rel=1e-12)
    # smoothing raises the loss of a well-separated pair and is symmetric at h = 0
    plain = losses.sigmoid(*(_t(c) for c in cols), beta=beta)
    assert got[0] > plain[0]
    assert got[2].item() == pytest.approx(math.log(2.0), rel=1e-12)


def test_sigmoid_large_margins_are_finite():
    big = _t([1e4, -1e4])
    zero = torch.zeros(2, dtype=torch.float64)
    got = losses.sigmoid(big, zero, zero, zero, beta=1.0)
    assert torch.isfinite(got).all()
    assert got[0].item() == pytest.approx(0.0, abs=1e-12)
    assert got[1].item() == pytest.approx(1e4, rel=1e-12)


def test_registry_alias_and_unknown():
    spec = losses.get("dpo")
    assert spec is losses.get("sigmoid")
    assert spec.name == "sigmoid" and spec.fn is losses.sigmoid
    assert spec.needs_reference and spec.paired
    assert {"beta", "label_smoothing"} <= set(spec.hyperparameters)
    with pytest.raises(KeyError, match="no-such-loss"):
        losses.get("no-such-loss")


def test_gradcheck_float64():
    torch.manual_seed(0)
    inputs = tuple((torch.randn(5, dtype=torch.float64) * 3 - 10).requires_grad_() for _ in range(4))
    assert torch.autograd.gradcheck(lambda *a: losses.sigmoid(*a, beta=0.3), inputs)
    assert torch.autograd.gradcheck(lambda *a: losses.sigmoid(*a, beta=0.3, label_smoothing=0.1), inputs)


@pytest.mark.parametrize("beta", [0.1, 1.5])
def test_analytic_gradient(beta):
    cols = [_t(c).requires_grad_() for c in zip(*CASES)]
    losses.sigmoid(*cols, beta=beta).sum().backward()
    lc, lr, rc, rr = (c.detach().tolist() for c in cols)
    for i in range(len(CASES)):
        h = (lc[i] - rc[i]) - (lr[i] - rr[i])
        s = 1.0 / (1.0 + math.exp(-beta * h))
        assert cols[0].grad[i].item() == pytest.approx(-beta * (1 - s), rel=1e-10, abs=1e-14)
        assert cols[1].grad[i].item() == pytest.approx(+beta * (1 - s), rel=1e-10, abs=1e-14)
        # the reference enters with the opposite sign
        assert cols[2].grad[i].item() == pytest.approx(+beta * (1 - s), rel=1e-10, abs=1e-14)
        assert cols[3].grad[i].item() == pytest.approx(-beta * (1 - s), rel=1e-10, abs=1e-14)
