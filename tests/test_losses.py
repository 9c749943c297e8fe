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


# --------------------------------------------------------------------------------------------
# the DPO-family additions, worked by hand (Δ_c = logp_c − ref_logp_c, Δ_r likewise, h = Δ_c − Δ_r)
# --------------------------------------------------------------------------------------------


def test_dpop_by_hand():
    # chosen below its reference: Δ_c = −12 − (−11) = −1, Δ_r = −15 − (−13) = −2, h = 1;
    # β = 0.1, λ = 50: x = 0.1·(1 − 50·1) = −4.9, L = log(1 + e^4.9)
    got = losses.dpop(_t([-12.0]), _t([-15.0]), _t([-11.0]), _t([-13.0]), beta=0.1, dpop_lambda=50.0)
    assert got.item() == pytest.approx(math.log1p(math.exp(4.9)), rel=1e-12)
    # CASES[0]: Δ_c = 1 ≥ 0, no penalty: DPO's log(1 + e^−0.2)
    cols = [_t([c]) for c in CASES[0]]
    assert losses.dpop(*cols).item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)


def test_cal_dpo_by_hand():
    # CASES[0]: Δ_c = 1, Δ_r = −1, h = 2. β = 0.5: targets ±1/(2β) = ±1 are met, L = log(1 + e^−2);
    # β = 0.1: targets ±5, L = log(1 + e^−2) + (1 − 5)² + (−1 + 5)² = log(1 + e^−2) + 32
    cols = [_t([c]) for c in CASES[0]]
    assert losses.cal_dpo(*cols, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-12)
    assert losses.cal_dpo(*cols, beta=0.1).item() == pytest.approx(math.log1p(math.exp(-2.0)) + 32, rel=1e-12)


def test_sampo_by_hand():
    # chosen: 5 tokens, rejected: 3 tokens, so T_m = 3 and 3 of the chosen tokens are kept
    pol_c, ref_c = [-1.0, -2.0, -0.5, -3.0, -1.0], [-1.5, -2.0, -1.0, -2.0, -0.5]
    pol_r, ref_r = [-2.0, -1.0, -4.0], [-1.0, -1.0, -3.0]
    keep_c, keep_r = losses.sampo_positions(5, 3, seed=7)
    assert len(keep_c) == 3 and keep_r == [0, 1, 2]
    # with the subset {0, 2, 3}: Δ_c^S = (−1 − 0.5 − 3) − (−1.5 − 1 − 2) = 0, Δ_r = −7 − (−5) = −2,
    # h = 2, β = 0.1: L = log(1 + e^−0.2); whole-response DPO has Δ_c = −7.5 − (−7) = −0.5, h = 1.5
    sums = [sum(v[i] for i in (0, 2, 3)) for v in (pol_c, ref_c)]
    got = losses.sampo(_t([sums[0]]), _t([sum(pol_r)]), _t([sums[1]]), _t([sum(ref_r)]), beta=0.1)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)
    full = losses.sampo(_t([sum(pol_c)]), _t([sum(pol_r)]), _t([sum(ref_c)]), _t([sum(ref_r)]), beta=0.1)
    assert full.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-12)


def test_beta_dpo_by_hand():
    # two pairs with h = 1 and 3 (mean 2), a state with M0 = 0 after one batch and momentum 0.5:
    # M0 ← 0.5·0 + 0.5·2 = 1, β_b = 0.1·(1 + 0.5·(2 − 1)) = 0.15, L = log(1 + e^(−0.15·h))
    st = losses.BetaDPOState(mean=0.0, std=1.0, count=1, momentum=0.5)
    zero = _t([0.0, 0.0])
    got = losses.beta_dpo(_t([1.0, 3.0]), zero, zero, zero, beta=0.1, beta_dpo_alpha=0.5, beta_dpo_rho=1.0, state=st)
    assert got.tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(-0.45))], rel=1e-12)
    # σ ← 0.5·1 + 0.5·std(1, 3) = 0.5 + 0.5·√2
    assert st.mean == 1.0 and st.std == pytest.approx(0.5 + 0.5 * math.sqrt(2), rel=1e-12) and st.count == 2


def test_tr_dpo_by_hand():
    # the loss is DPO against the current reference (CASES[0]: log(1 + e^−0.2)); the reference's
    # weights move as θ_ref ← 0.6·θ + 0.4·θ_ref: [1, −2] towards [3, 0] gives [2.2, −0.8]
    cols = [_t([c]) for c in CASES[0]]
    assert losses.tr_dpo(*cols).item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)
    moved = losses.mix_reference(_t([1.0, -2.0]), _t([3.0, 0.0]), 0.6)
    assert moved.tolist() == pytest.approx([2.2, -0.8], rel=1e-15)


def test_alphapo_by_hand():
    # m_c = −2/2 = −1, m_r = −6/3 = −2; α = 0.5: r = (1 − e^(−α·m))/α, r_c = 2(1 − e^0.5),
    # r_r = 2(1 − e^1); β = 2, γ = 1: L = −log σ(2(r_c − r_r) − 1) = log(1 + e^−(4(e − e^0.5) − 1))
    got = losses.alphapo(
        _t([-2.0]), _t([-6.0]), len_c=_t([2.0]), len_r=_t([3.0]), beta=2.0, gamma=1.0, alphapo_alpha=0.5
    )
    x = 4 * (math.e - math.exp(0.5)) - 1
    assert got.item() == pytest.approx(math.log1p(math.exp(-x)), rel=1e-12)
    # α = 0: SimPO's −log σ(2·(−1 + 2) − 1) = log(1 + e^−1)
    got = losses.alphapo(
        _t([-2.0]), _t([-6.0]), len_c=_t([2.0]), len_r=_t([3.0]), beta=2.0, gamma=1.0, alphapo_alpha=0.0
    )
    assert got.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
