"""Every registered loss against hand computation, autograd and its registry declaration.

(a) golden values: each loss is recomputed here with Python's `math` on plain floats, independently
    of torch, for at least two inputs and two hyperparameter settings;
(b) torch.autograd.gradcheck in float64 w.r.t. the policy log-probs;
(c) DPO's analytic gradient;
(d) the registry: declarations, aliases, `get`/`names`, hyperparameters accepted by each fn.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from prefopt import losses

DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids OpenMP contention on a shared machine
    yield
    torch.set_num_threads(threads)


def t(x):
    return torch.tensor(x, dtype=DT)


# --------------------------------------------------------------------------------------------
# scalar references (plain floats, math only)
# --------------------------------------------------------------------------------------------


def sig(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def smoothed(x, eps):
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def f_prime(u, divergence, alpha):
    if divergence == "reverse_kl":
        return u
    if divergence == "forward_kl":
        return -math.exp(-u)
    if divergence == "js":
        return math.log(2 * math.exp(u) / (1 + math.exp(u)))  # log(2x/(1+x)), x = π/π_ref
    return (1 - math.exp(u) ** (-alpha)) / alpha  # (1 − x^−α)/α


def mean(xs):
    return sum(xs) / len(xs)


def pairs(d):
    return range(len(d["lc"]))


def ref_sigmoid(d, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=1.0):
    out = []
    for i in pairs(d):
        h = f_prime(d["lc"][i] - d["rc"][i], f_divergence, f_alpha) - f_prime(
            d["lr"][i] - d["rr"][i], f_divergence, f_alpha
        )
        out.append(smoothed(beta * h, label_smoothing))
    return out


def _h(d, i):
    return (d["lc"][i] - d["rc"][i]) - (d["lr"][i] - d["rr"][i])


def ref_robust(d, beta=0.1, label_smoothing=0.0):
    e = label_smoothing
    return [((1 - e) * -logsig(beta * _h(d, i)) - e * -logsig(-beta * _h(d, i))) / (1 - 2 * e) for i in pairs(d)]


def ref_ipo(d, beta=0.1, ipo_normalize=True):
    out = []
    for i in pairs(d):
        a, b = d["lc"][i] - d["rc"][i], d["lr"][i] - d["rr"][i]
        if ipo_normalize:
            a, b = a / d["nc"][i], b / d["nr"][i]
        out.append((a - b - 1 / (2 * beta)) ** 2)
    return out


def ref_hinge(d, beta=0.1):
    return [max(0.0, 1 - beta * _h(d, i)) for i in pairs(d)]


def ref_exo_pair(d, beta=0.1, label_smoothing=1e-3):
    e = label_smoothing or 1e-3
    out = []
    for i in pairs(d):
        p = sig(beta * _h(d, i))
        out.append(p * (math.log(p) - math.log(1 - e)) + (1 - p) * (math.log(1 - p) - math.log(e)))
    return out


def ref_nca_pair(d, beta=0.1):
    return [
        -logsig(beta * (d["lc"][i] - d["rc"][i]))
        - 0.5 * logsig(-beta * (d["lc"][i] - d["rc"][i]))
        - 0.5 * logsig(-beta * (d["lr"][i] - d["rr"][i]))
        for i in pairs(d)
    ]


def _delta(rewards, state):
    if state is None:
        return mean(rewards)
    m0, n0 = state
    n = len(rewards)
    return m0 + (mean(rewards) - m0) * n / (n0 + n)


def ref_bco_pair(d, beta=0.1, state=None):
    rc = [beta * (d["lc"][i] - d["rc"][i]) for i in pairs(d)]
    rr = [beta * (d["lr"][i] - d["rr"][i]) for i in pairs(d)]
    delta = _delta(rc + rr, state)
    return [-logsig(rc[i] - delta) - logsig(-(rr[i] - delta)) for i in pairs(d)]


def ref_sppo_hard(d, beta=0.1):
    return [(d["lc"][i] - d["rc"][i] - 0.5 / beta) ** 2 + (d["lr"][i] - d["rr"][i] + 0.5 / beta) ** 2 for i in pairs(d)]


def ref_aot(d, beta=0.1, label_smoothing=0.0):
    a = sorted(d["lc"][i] - d["lr"][i] for i in pairs(d))
    b = sorted(d["rc"][i] - d["rr"][i] for i in pairs(d))
    return [smoothed(beta * (x - y), label_smoothing) for x, y in zip(a, b)]


def ref_aot_pair(d, beta=0.1, label_smoothing=0.0):
    a = sorted(d["lc"][i] - d["rc"][i] for i in pairs(d))
    b = sorted(d["lr"][i] - d["rr"][i] for i in pairs(d))
    return [smoothed(beta * (x - y), label_smoothing) for x, y in zip(a, b)]


def ref_apo_zero(d, beta=0.1):
    return [1 - sig(beta * (d["lc"][i] - d["rc"][i])) + sig(beta * (d["lr"][i] - d["rr"][i])) for i in pairs(d)]


def ref_apo_down(d, beta=0.1):
    return [sig(beta * (d["lc"][i] - d["rc"][i])) + 1 - sig(beta * _h(d, i)) for i in pairs(d)]


def ref_discopop(d, beta=0.1, discopop_tau=0.05):
    out = []
    for i in pairs(d):
        x = beta * _h(d, i)
        m = sig(x / discopop_tau)
        out.append((1 - m) * -logsig(x) + m * math.exp(-x))
    return out


def ref_sigmoid_norm(d, beta=5.0):
    return [
        -logsig(beta * ((d["lc"][i] - d["rc"][i]) / d["nc"][i] - (d["lr"][i] - d["rr"][i]) / d["nr"][i]))
        for i in pairs(d)
    ]


def ref_sigmoid_ref_free(d, beta=0.1, label_smoothing=0.0):
    return [smoothed(beta * (d["lc"][i] - d["lr"][i]), label_smoothing) for i in pairs(d)]


def ref_simpo(d, beta=2.0, gamma=1.0):
    return [-logsig(beta * d["lc"][i] / d["nc"][i] - beta * d["lr"][i] / d["nr"][i] - gamma) for i in pairs(d)]


def ref_cpo(d, beta=0.1, alpha=1.0):
    return [-logsig(beta * (d["lc"][i] - d["lr"][i])) - alpha * d["lc"][i] / d["nc"][i] for i in pairs(d)]


def ref_orpo(d, orpo_lambda=0.1):
    out = []
    for i in pairs(d):
        mc, mr = d["lc"][i] / d["nc"][i], d["lr"][i] / d["nr"][i]
        odds_c = math.log(math.exp(mc) / (1 - math.exp(mc)))
        odds_r = math.log(math.exp(mr) / (1 - math.exp(mr)))
        out.append(-mc - orpo_lambda * logsig(odds_c - odds_r))
    return out


def ref_sft(d):
    return [-d["lc"][i] / d["nc"][i] for i in pairs(d)]


def ref_rpo(d, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=1.0, rpo_alpha=1.0):
    base = ref_sigmoid(d, beta, label_smoothing, f_divergence, f_alpha)
    return [b + rpo_alpha * n for b, n in zip(base, ref_sft(d))]


def ref_mpo(d, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=1.0, state=None):
    a = ref_sigmoid(d, beta, label_smoothing, f_divergence, f_alpha)
    b = ref_bco_pair(d, beta, state)
    c = ref_sft(d)
    return [0.8 * x + 0.2 * y + 1.0 * z for x, y, z in zip(a, b, c)]


def ref_kto(d, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    z0 = 0.0
    if d.get("kl") is not None:
        z0 = max(0.0, mean([a - b for a, b in zip(d["kl"], d["kl_ref"])]))
    out = []
    for lp, rp, good in zip(d["lp"], d["ref"], d["label"]):
        delta = lp - rp
        out.append(
            desirable_weight * (1 - sig(beta * (delta - z0)))
            if good
            else undesirable_weight * (1 - sig(beta * (z0 - delta)))
        )
    return out


def ref_bco(d, beta=0.1, state=None):
    r = [beta * (lp - rp) for lp, rp in zip(d["lp"], d["ref"])]
    delta = _delta(r, state)
    return [-logsig(x - delta) if good else -logsig(-(x - delta)) for x, good in zip(r, d["label"])]


def ref_apo_zero_unpaired(d, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    return [
        desirable_weight * (1 - sig(beta * (lp - rp))) if good else undesirable_weight * sig(beta * (lp - rp))
        for lp, rp, good in zip(d["lp"], d["ref"], d["label"])
    ]


REFERENCE = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_") and callable(fn)}

# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

PAIRED_INPUTS = [
    # no ties among the sorted quantities of AOT (its gradient is only piecewise smooth)
    dict(
        lc=[-3.2, -10.5, -6.95],
        lr=[-4.1, -9.0, -7.9],
        rc=[-3.5, -10.0, -7.4],
        rr=[-3.9, -9.7, -7.05],
        nc=[4.0, 12.0, 7.0],
        nr=[5.0, 9.0, 8.0],
    ),
    dict(lc=[-20.0, -1.5], lr=[-35.0, -0.7], rc=[-25.0, -1.0], rr=[-30.0, -1.2], nc=[10.0, 2.0], nr=[14.0, 1.0]),
]
UNPAIRED_INPUTS = [
    dict(
        lp=[-3.0, -8.0, -5.5, -2.0],
        ref=[-3.4, -7.5, -5.0, -2.6],
        label=[True, False, True, False],
        kl=[-4.0, -6.0, -3.0],
        kl_ref=[-4.5, -6.2, -3.9],
    ),  # z0 = 0.533…
    dict(
        lp=[-12.0, -1.0, -30.0],
        ref=[-10.0, -1.5, -26.0],
        label=[False, True, True],
        kl=[-4.0, -6.0],
        kl_ref=[-3.0, -5.5],
    ),  # mean KL estimate < 0 → z0 = 0
]

# hyperparameters for the second golden run of each loss (the first uses the defaults)
VARIANT = {
    "sigmoid": [
        dict(beta=0.3, label_smoothing=0.1),
        dict(beta=0.2, f_divergence="forward_kl"),
        dict(beta=0.2, f_divergence="js"),
        dict(beta=0.2, f_divergence="alpha", f_alpha=0.5),
    ],
    "robust": [dict(beta=0.3, label_smoothing=0.2)],
    "ipo": [dict(beta=0.5, ipo_normalize=False)],
    "hinge": [dict(beta=0.7)],
    "exo_pair": [dict(beta=0.3, label_smoothing=0.05), dict(label_smoothing=0.0)],
    "nca_pair": [dict(beta=0.4)],
    "bco_pair": [dict(beta=0.3)],
    "sppo_hard": [dict(beta=0.5)],
    "aot": [dict(beta=0.3, label_smoothing=0.1)],
    "aot_pair": [dict(beta=0.3, label_smoothing=0.1)],
    "apo_zero": [dict(beta=0.4)],
    "apo_down": [dict(beta=0.4)],
    "discopop": [dict(beta=0.05, discopop_tau=0.2)],
    "sigmoid_norm": [dict(beta=1.5)],
    "sigmoid_ref_free": [dict(beta=0.3, label_smoothing=0.1)],
    "simpo": [dict(beta=2.5, gamma=0.3)],
    "cpo": [dict(beta=0.3, alpha=0.5)],
    "orpo": [dict(orpo_lambda=0.5)],
    "sft": [],
    "rpo": [dict(beta=0.3, rpo_alpha=0.25)],
    "mpo": [dict(beta=0.3, label_smoothing=0.1)],
    "kto": [dict(beta=0.3, desirable_weight=1.33, undesirable_weight=0.8)],
    "bco": [dict(beta=0.3)],
    "apo_zero_unpaired": [dict(beta=0.3, desirable_weight=2.0, undesirable_weight=0.5)],
}


def run(spec, d, grad=False, **kw):
    """Call spec.fn on input dict d (tensors built here); returns (out, inputs needing grad)."""
    if spec.paired:
        lc, lr = t(d["lc"]).requires_grad_(grad), t(d["lr"]).requires_grad_(grad)
        out = spec.fn(lc, lr, t(d["rc"]), t(d["rr"]), len_c=t(d["nc"]), len_r=t(d["nr"]), **kw)
        return out, (lc, lr)
    lp = t(d["lp"]).requires_grad_(grad)
    kl = None if d.get("kl") is None else t(d["kl"])
    kl_ref = None if d.get("kl_ref") is None else t(d["kl_ref"])
    out = spec.fn(lp, t(d["ref"]), torch.tensor(d["label"]), kl_logp=kl, kl_ref_logp=kl_ref, **kw)
    return out, (lp,)


def golden_cases():
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        inputs = PAIRED_INPUTS if spec.paired else UNPAIRED_INPUTS
        for kw in [{}] + VARIANT[name]:
            for k, d in enumerate(inputs):
                yield pytest.param(
                    name, d, kw, id=f"{name}-{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'defaults'}"
                )


# --------------------------------------------------------------------------------------------
# (a) golden values
# --------------------------------------------------------------------------------------------


def test_every_loss_has_a_reference_and_variants():
    assert set(REFERENCE) == set(losses.REGISTRY)
    assert set(VARIANT) == set(losses.REGISTRY)


@pytest.mark.parametrize("name,d,kw", list(golden_cases()))
def test_golden(name, d, kw):
    spec = losses.get(name)
    out, _ = run(spec, d, **kw)
    want = REFERENCE[name](d, **kw)
    assert out.dtype == DT and out.shape == (len(want),)
    assert out.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_golden_reference_smoke():
    """A few values worked out by hand, so the scalar references themselves are pinned."""
    d = dict(lc=[-1.0], lr=[-2.0], rc=[-1.5], rr=[-1.0], nc=[1.0], nr=[1.0])  # Δc = .5, Δr = −1, h = 1.5
    assert ref_sigmoid(d, beta=1.0)[0] == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-15)
    assert ref_hinge(d, beta=0.5)[0] == pytest.approx(0.25, rel=1e-15)
    assert ref_ipo(d, beta=0.5, ipo_normalize=False)[0] == pytest.approx(0.25, rel=1e-15)
    assert ref_sppo_hard(d, beta=0.5)[0] == pytest.approx((0.5 - 1) ** 2 + (-1 + 1) ** 2, rel=1e-15)
    assert ref_sft(d)[0] == 1.0


@pytest.mark.parametrize("state", [(0.0, 0), (-0.3, 10)])
def test_golden_bco_with_running_state(state):
    d = PAIRED_INPUTS[0]
    st = losses.BCOState(*state)
    out, _ = run(losses.get("bco_pair"), d, beta=0.3, state=st)
    assert out.tolist() == pytest.approx(ref_bco_pair(d, beta=0.3, state=state), rel=1e-12)
    assert st.count == state[1] + 6
    du = UNPAIRED_INPUTS[0]
    st = losses.BCOState(*state)
    out, _ = run(losses.get("bco"), du, beta=0.3, state=st)
    assert out.tolist() == pytest.approx(ref_bco(du, beta=0.3, state=state), rel=1e-12)


def test_bco_state_is_running_mean():
    st = losses.BCOState()
    st.update(t([1.0, 2.0, 3.0]))
    st.update(t([10.0]))
    assert st.mean == pytest.approx(4.0) and st.count == 4
    st.update(t([]))
    assert st.count == 4


def test_kto_without_kl_uses_zero_reference_point():
    d = dict(UNPAIRED_INPUTS[0], kl=None, kl_ref=None)
    out, _ = run(losses.get("kto"), d, beta=0.3)
    assert out.tolist() == pytest.approx(ref_kto(d, beta=0.3), rel=1e-12)
    # and with z0 = 0, KTO and unpaired APO-zero coincide on desirable examples
    apo, _ = run(losses.get("apo_zero_unpaired"), d, beta=0.3)
    assert out[0].item() == pytest.approx(apo[0].item(), rel=1e-12)


def test_f_log_ratio_golden():
    lp, rp = t([-2.0, -5.0, -1.0]), t([-2.5, -4.0, -1.0])
    for div, a in [("reverse_kl", 1.0), ("forward_kl", 1.0), ("js", 1.0), ("alpha", 0.5), ("alpha", 2.0)]:
        got = losses.f_log_ratio(lp, rp, div, a).tolist()
        want = [f_prime(x - y, div, a) for x, y in zip(lp.tolist(), rp.tolist())]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14), div
    with pytest.raises(ValueError):
        losses.f_log_ratio(lp, rp, "hellinger")
    with pytest.raises(ValueError):
        losses.f_log_ratio(lp, rp, "alpha", 0.0)
    # extreme ratios stay finite
    assert torch.isfinite(losses.f_log_ratio(t([-2000.0]), t([0.0]), "forward_kl")).all()


def test_log1mexp_accuracy():
    for m in [-1e-12, -1e-6, -0.1, -0.69, -0.7, -1.0, -5.0, -40.0, -800.0]:
        want = math.log(-math.expm1(m)) if m > -0.6931 else math.log1p(-math.exp(m))
        assert losses.log1mexp(t([m])).item() == pytest.approx(want, rel=1e-14, abs=1e-300)


def test_orpo_stable_near_certain_and_impossible_tokens():
    # m = logp/len → 0 (a response the model is sure of) and m → −∞ both stay finite
    lc, lr = t([-1e-9, -2000.0]), t([-3.0, -1e-10])
    n = t([1.0, 1.0])
    out = losses.orpo(lc, lr, len_c=n, len_r=n)
    assert torch.isfinite(out).all()


def test_discopop_finite_for_extreme_margins():
    z = t([0.0, 0.0])
    out = losses.discopop(t([-5000.0, 5000.0]), z, z, z, beta=1.0)
    assert torch.isfinite(out).all()
    assert out[1].item() == pytest.approx(0.0, abs=1e-300)


def test_wpo_weights_golden():
    lc, lr, nc, nr = t([-2.0, -30.0]), t([-3.0, -1.0]), t([4.0, 10.0]), t([3.0, 2.0])
    w = losses.wpo_weights(lc.requires_grad_(), lr, nc, nr)
    want = [min(1.0, math.exp(-2.0 / 4 + -3.0 / 3)), min(1.0, math.exp(-30.0 / 10 + -1.0 / 2))]
    assert w.tolist() == pytest.approx(want, rel=1e-12)
    assert not w.requires_grad
    sq_c, sq_r = t([-1.0, -2.0]), t([-0.5, -0.25])  # Σ_t log Σ_v π², the "alignment" correction
    w2 = losses.wpo_weights(lc, lr, nc, nr, sq_mass_c=sq_c, sq_mass_r=sq_r, clamp_max=None)
    want2 = [math.exp((-2.0 + 1.0) / 4 + (-3.0 + 0.5) / 3), math.exp((-30.0 + 2.0) / 10 + (-1.0 + 0.25) / 2)]
    assert w2.tolist() == pytest.approx(want2, rel=1e-12)


def test_ld_logps_golden():
    got = losses.ld_logps(t([-4.0, -7.5]), t([-6.0, 0.0]), 0.3)
    assert got.tolist() == pytest.approx([-4.0 - 1.8, -7.5], rel=1e-15)
    assert losses.ld_logps(t([-4.0]), t([-6.0]), 1.0).item() == -10.0  # α = 1: plain log-prob


# --------------------------------------------------------------------------------------------
# (b) gradcheck
# --------------------------------------------------------------------------------------------


class FrozenState(losses.BCOState):
    """δ held fixed, as the detached running mean is for the gradient."""

    def update(self, rewards):
        return self.mean


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
@pytest.mark.parametrize("k", [0, 1])
def test_gradcheck(name, k):
    spec = losses.get(name)
    d = (PAIRED_INPUTS if spec.paired else UNPAIRED_INPUTS)[k]
    kw = dict(VARIANT[name][0]) if VARIANT[name] else {}
    if spec.stateful:
        kw["state"] = FrozenState(mean=-0.05, count=3)
    if spec.paired:
        rc, rr, nc, nr = t(d["rc"]), t(d["rr"]), t(d["nc"]), t(d["nr"])

        def f(lc, lr):
            return spec.fn(lc, lr, rc, rr, len_c=nc, len_r=nr, **kw)

        args = (t(d["lc"]).requires_grad_(), t(d["lr"]).requires_grad_())
    else:
        ref, label = t(d["ref"]), torch.tensor(d["label"])
        kl, kl_ref = t(d["kl"]), t(d["kl_ref"])

        def f(lp):
            return spec.fn(lp, ref, label, kl_logp=kl, kl_ref_logp=kl_ref, **kw)

        args = (t(d["lp"]).requires_grad_(),)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_bco_delta_is_detached():
    """With state=None δ is the batch mean, but no gradient flows through it."""
    d = PAIRED_INPUTS[0]
    out, (lc, lr) = run(losses.get("bco_pair"), d, grad=True, beta=0.3)
    g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
    delta = mean(
        [0.3 * (d["lc"][i] - d["rc"][i]) for i in range(3)] + [0.3 * (d["lr"][i] - d["rr"][i]) for i in range(3)]
    )
    for i in range(3):
        rc = 0.3 * (d["lc"][i] - d["rc"][i])
        rr = 0.3 * (d["lr"][i] - d["rr"][i])
        assert g_c[i].item() == pytest.approx(-0.3 * (1 - sig(rc - delta)), rel=1e-12)
        assert g_r[i].item() == pytest.approx(0.3 * sig(rr - delta), rel=1e-12)


# --------------------------------------------------------------------------------------------
# (c) DPO's analytic gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_analytic_gradient(beta):
    for d in PAIRED_INPUTS:
        out, (lc, lr) = run(losses.get("dpo"), d, grad=True, beta=beta)
        g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
        for i in pairs(d):
            s = 1 - sig(beta * _h(d, i))  # = σ(−βh)
            assert g_c[i].item() == pytest.approx(-beta * s, rel=1e-12)
            assert g_r[i].item() == pytest.approx(+beta * s, rel=1e-12)


# --------------------------------------------------------------------------------------------
# (d) registry
# --------------------------------------------------------------------------------------------

REFERENCE_FREE = {"simpo", "cpo", "orpo", "sigmoid_ref_free", "sft"}
UNPAIRED = {"kto", "bco", "apo_zero_unpaired"}
NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "simpo", "cpo", "orpo", "sft", "rpo", "mpo"}  # raise without len_c/len_r
PER_TOKEN_REWARD = {"ipo", "sigmoid_norm", "simpo"}  # ipo: with its default ipo_normalize
KL_BASELINE = {"kto"}
ORDER_STATISTICS = {"aot", "aot_pair"}
STATEFUL = {"bco_pair", "bco", "mpo"}
REQUIRED = {
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "cpo",
    "orpo",
    "sigmoid_ref_free",
    "kto",
    "bco",
    "apo_zero_unpaired",
    "rpo",
    "mpo",
}
CONFIG_KEYS = {
    "beta",
    "label_smoothing",
    "gamma",
    "alpha",
    "orpo_lambda",
    "desirable_weight",
    "undesirable_weight",
    "ipo_normalize",
    "f_divergence",
    "f_alpha",
    "ld_alpha",
    "rpo_alpha",
    "discopop_tau",
}


def test_registry_declarations():
    assert REQUIRED <= set(losses.REGISTRY)
    for name, spec in losses.REGISTRY.items():
        assert spec.name == name
        assert spec.needs_reference == (name not in REFERENCE_FREE), name
        assert spec.paired == (name not in UNPAIRED), name
        assert spec.reward_is_per_token() == (name in PER_TOKEN_REWARD), name
        assert spec.kl_baseline == (name in KL_BASELINE), name
        assert spec.per_pair == (name not in ORDER_STATISTICS), name
        assert spec.stateful == (name in STATEFUL), name
        assert isinstance(spec.hyperparameters, dict)
        assert set(spec.hyperparameters) <= CONFIG_KEYS, name  # LossConfig's names, nothing else
        assert spec.fn.__doc__, name  # the formula


def test_get_aliases_and_errors():
    assert losses.get("dpo") is losses.get("sigmoid")
    assert losses.get("cdpo") is losses.get("sigmoid")
    assert losses.get("slic") is losses.get("hinge")
    assert losses.get("rdpo") is losses.get("robust")
    for alias, target in losses.ALIASES.items():
        assert target in losses.REGISTRY and alias not in losses.REGISTRY
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        losses.get("nope")
    with pytest.raises(KeyError):
        losses.get("")


def test_names_filters():
    assert losses.names() == sorted(losses.REGISTRY)
    assert set(losses.names(paired=False)) == UNPAIRED
    assert set(losses.names(needs_reference=False)) == REFERENCE_FREE
    assert set(losses.names(paired=True, needs_reference=False)) == REFERENCE_FREE
    assert losses.names(paired=False, needs_reference=False) == []


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
def test_hyperparameters_accepted_and_defaults_match(name):
    spec = losses.get(name)
    d = (PAIRED_INPUTS if spec.paired else UNPAIRED_INPUTS)[0]
    out, _ = run(spec, d, **spec.hyperparameters)
    assert out.shape == (len(d["lc"] if spec.paired else d["lp"]),) and torch.isfinite(out).all()
    default_out, _ = run(spec, d)
    assert torch.equal(out, default_out)  # the declared defaults are the fn's defaults
    params = inspect.signature(spec.fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for k, v in spec.hyperparameters.items():
            assert params[k].kind is inspect.Parameter.KEYWORD_ONLY and params[k].default == v, (name, k)
    with pytest.raises(TypeError):
        run(spec, d, not_a_hyperparameter=1.0)


@pytest.mark.parametrize("name", sorted(set(losses.REGISTRY) - REFERENCE_FREE - UNPAIRED))
def test_reference_losses_refuse_missing_reference(name):
    spec = losses.get(name)
    d = PAIRED_INPUTS[0]
    with pytest.raises(ValueError, match="ref"):
        spec.fn(t(d["lc"]), t(d["lr"]), len_c=t(d["nc"]), len_r=t(d["nr"]))


@pytest.mark.parametrize("name", sorted(NEEDS_LENGTHS))
def test_length_losses_refuse_missing_lengths(name):
    spec = losses.get(name)
    d = PAIRED_INPUTS[0]
    with pytest.raises(ValueError, match="len"):
        spec.fn(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]))


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_ignore_reference(name):
    spec = losses.get(name)
    d = PAIRED_INPUTS[0]
    a = spec.fn(t(d["lc"]), t(d["lr"]), len_c=t(d["nc"]), len_r=t(d["nr"]))
    b = spec.fn(t(d["lc"]), t(d["lr"]), t(d["rc"]) - 3, t(d["rr"]) + 1, len_c=t(d["nc"]), len_r=t(d["nr"]))
    assert torch.equal(a, b)


def test_sigmoid_keeps_its_old_call():
    d = PAIRED_INPUTS[0]
    out = losses.sigmoid(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]), beta=0.1)
    assert out.tolist() == pytest.approx(ref_sigmoid(d, beta=0.1), rel=1e-12)
    out = losses.REGISTRY["sigmoid"].fn(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]), beta=0.1, label_smoothing=0.2)
    assert out.tolist() == pytest.approx(ref_sigmoid(d, beta=0.1, label_smoothing=0.2), rel=1e-12)


def test_robust_rejects_bad_flip_rate():
    d = PAIRED_INPUTS[0]
    with pytest.raises(ValueError):
        run(losses.get("robust"), d, label_smoothing=0.5)


def test_with_nll_and_combine():
    d = PAIRED_INPUTS[1]
    fn = losses.with_nll(losses.hinge, rpo_alpha=0.5)
    assert inspect.signature(fn).parameters["rpo_alpha"].default == 0.5
    out, _ = run(losses.LossSpec("x", fn), d, beta=0.3)
    want = [a + 0.5 * b for a, b in zip(ref_hinge(d, beta=0.3), ref_sft(d))]
    assert out.tolist() == pytest.approx(want, rel=1e-12)

    spec = losses.combine([("ipo", 0.5), ("simpo", 2.0)])
    assert spec.paired and spec.needs_reference and spec.per_pair
    assert set(spec.hyperparameters) == {"beta", "ipo_normalize", "gamma"}
    out, _ = run(spec, d, beta=0.7, gamma=0.2)
    want = [0.5 * a + 2.0 * b for a, b in zip(ref_ipo(d, beta=0.7), ref_simpo(d, beta=0.7, gamma=0.2))]
    assert out.tolist() == pytest.approx(want, rel=1e-12)
    free = losses.combine([(losses.get("sft"), 1.0), ("orpo", 1.0)], name="free")
    assert free.name == "free" and not free.needs_reference
    with pytest.raises(ValueError):
        losses.combine([("kto", 1.0)])
    with pytest.raises(ValueError):
        losses.combine([])
    with pytest.raises(TypeError):
        spec.fn(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]), len_c=t(d["nc"]), len_r=t(d["nr"]), orpo_lambda=1)
