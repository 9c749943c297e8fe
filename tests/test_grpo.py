"""prefopt.grpo: advantages, ratio, clipping, KL and aggregations against values computed by hand
(plain Python `math` on floats), gradients, and the exactly solvable bandit.

The bandit (item 5 of issue 14) is test_tabular.py's: one prompt, K = 5 single-token responses,
π = softmax(θ), fixed π_ref, known reward r, β = 0.5. Expectations over a group of G samples from π
are exact: the groups are enumerated as count vectors n (Σ n_k = G) with multinomial weights, and
the loss is `grpo.policy_loss` on one row per (group, response) with the row's probability as its
mask weight ("bnpo": Σ weight·ℓ / Σ weight), so autograd gives the exact expected gradient of the
loss as a trainer would compute it (the samples' probabilities held fixed, as sampling does).
G = ∞ uses the population baseline E_π[r] (and population std σ_π). Results (`pytest -s` prints
them) are in docs/grpo.md.
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from prefopt import grpo

DT = torch.float64


def t(x):
    return torch.tensor(x, dtype=DT)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: one thread avoids OpenMP contention on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------

REWARDS = [[1.0, 0.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 0.0, 0.0]]


def _by_hand_advantages(rows, scale, eps=1e-4):
    flat = [x for row in rows for x in row]
    out = []
    for row in rows:
        m = sum(row) / len(row)
        s = {"group": statistics.stdev(row), "batch": statistics.stdev(flat), "none": None}[scale]
        out.append([(x - m) if s is None else (x - m) / (s + eps) for x in row])
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_by_hand(scale):
    adv, stats = grpo.group_advantages(t(REWARDS), scale)
    assert torch.allclose(adv, t(_by_hand_advantages(REWARDS, scale)), atol=1e-12, rtol=0)
    assert abs(float(stats["reward"]) - sum(map(sum, REWARDS)) / 12) < 1e-12
    assert float(stats["frac_reward_zero_std"]) == pytest.approx(1 / 3)  # the all-3 group
    if scale == "batch":
        assert float(stats["reward_std"]) == pytest.approx(statistics.stdev([x for r in REWARDS for x in r]))
    else:
        assert float(stats["reward_std"]) == pytest.approx(sum(statistics.stdev(r) for r in REWARDS) / 3)


def test_advantages_numbers():
    """One group spelled out: r = (1, 0, 0.5, 2), mean 0.875, unbiased std √(2.1875/3)."""
    adv, _ = grpo.group_advantages(t([REWARDS[0]]), "group")
    s = math.sqrt((0.125**2 + 0.875**2 + 0.375**2 + 1.125**2) / 3)
    assert abs(s - 0.853912563829966) < 1e-12
    expect = [0.125 / (s + 1e-4), -0.875 / (s + 1e-4), -0.375 / (s + 1e-4), 1.125 / (s + 1e-4)]
    assert torch.allclose(adv[0], t(expect), atol=1e-12, rtol=0)
    none, _ = grpo.group_advantages(t([REWARDS[0]]), "none")
    assert none[0].tolist() == [0.125, -0.875, -0.375, 1.125]


def test_advantages_edge_cases():
    adv, stats = grpo.group_advantages(t([[2.0], [5.0]]), "group")  # G = 1: no NaN, A = 0
    assert adv.tolist() == [[0.0], [0.0]] and float(stats["frac_reward_zero_std"]) == 1.0
    adv, _ = grpo.group_advantages(t([[1.0, 1.0]]), "group")  # zero std: A = 0 / eps = 0
    assert adv.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(t(REWARDS), "std")
    with pytest.raises(ValueError, match="prompts, group size"):
        grpo.group_advantages(t(REWARDS[0]), "group")


def test_advantages_float32():
    adv, _ = grpo.group_advantages(torch.tensor(REWARDS), "group")
    assert adv.dtype == torch.float32
    assert torch.allclose(adv.double(), t(_by_hand_advantages(REWARDS, "group")), atol=1e-6)


# --------------------------------------------------------------------------------------------
# ratio and clip
# --------------------------------------------------------------------------------------------

RHOS = [0.7, 0.9, 1.0, 1.1, 1.25, 1.4]


def test_clip_by_hand_symmetric_and_asymmetric():
    """ε_low = 0.2; ε_high = 0.2 (PPO) and 0.28 (DAPO). A = +1.5 and −1.5, ρ across both edges."""
    log_w = t([RHOS, RHOS]).log()
    a = t([1.5, -1.5])
    # A = +1.5: min(ρA, clip(ρ)A); only ρ > 1 + ε_high is clipped (1.2·1.5 = 1.8, 1.28·1.5 = 1.92)
    sym_pos = [-1.05, -1.35, -1.5, -1.65, -1.8, -1.8]
    dapo_pos = [-1.05, -1.35, -1.5, -1.65, -1.875, -1.92]
    # A = −1.5: only ρ < 1 − ε_low is clipped (0.8·1.5 = 1.2); large ρ is not
    neg = [1.2, 1.35, 1.5, 1.65, 1.875, 2.1]
    for eps_high, pos in ((0.2, sym_pos), (0.28, dapo_pos)):
        loss, low, high = grpo.clipped_surrogate(log_w, a, 0.2, eps_high)
        assert torch.allclose(loss, t([pos, neg]), atol=1e-12, rtol=0), eps_high
        assert low.tolist() == [[False] * 6, [True] + [False] * 5]
        n_high = 2 if eps_high == 0.2 else 1
        assert high.tolist() == [[False] * (6 - n_high) + [True] * n_high, [False] * 6]


def test_clip_gradient_zero_where_clipped():
    """d ℓ/d logp = −A·ρ where the unclipped term is the min, 0 where the clipped one is."""
    logp = t([RHOS, RHOS]).log().requires_grad_(True)
    a = t([1.5, -1.5])
    loss, low, high = grpo.clipped_surrogate(logp - 0.0, a, 0.2, 0.28)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    expect = [[0.0 if h else -1.5 * r for r, h in zip(RHOS, high[0].tolist())]]
    expect.append([0.0 if lo else 1.5 * r for r, lo in zip(RHOS, low[1].tolist())])
    assert torch.allclose(g, t(expect), atol=1e-12, rtol=0)


def test_sequence_ratio_gspo_by_hand():
    """GSPO: log ρ = mean over the sequence's tokens of (logp − old_logp), padding ignored."""
    logp = t([[-1.0, -2.0, -0.5, -9.0], [-0.3, -0.4, -7.0, -7.0]])
    old = t([[-1.2, -1.5, -0.9, -1.0], [-0.1, -0.2, -1.0, -2.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    log_w = grpo.log_importance_weights(logp, old, mask, "sequence")
    assert log_w.shape == (2, 1)
    assert abs(float(log_w[0, 0]) - (0.2 - 0.5 + 0.4) / 3) < 1e-12
    assert abs(float(log_w[1, 0]) - (-0.2 - 0.2) / 2) < 1e-12
    assert torch.equal(grpo.log_importance_weights(logp, old, mask, "token"), logp - old)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.log_importance_weights(logp, old, mask, "seq")


# --------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------


def test_k3_by_hand():
    logp, ref = [-1.0, -2.5, -0.1, -3.0], [-1.0, -1.5, -0.7, -6.0]
    expect = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp, ref)]
    assert torch.allclose(grpo.kl_k3(t(logp), t(ref)), t(expect), atol=1e-14, rtol=0)
    tiny = grpo.kl_k3(t([0.0]), t([1e-9]))  # ≈ d²/2, no cancellation to 0
    assert abs(float(tiny) - 0.5e-18) < 1e-24


PI = [0.5, 0.2, 0.2, 0.1]
PI_R = [0.25, 0.25, 0.4, 0.1]


def test_k3_expectation_is_reverse_kl_but_its_gradient_is_forward_kl():
    """E_{y~π}[k3(y)] = KL(π‖π_ref) exactly; differentiated through log π with the samples' weights
    held fixed (as a sampled loss is), its expected gradient is ∇_θ KL(π_ref‖π)."""
    theta = t(PI).log().requires_grad_(True)
    lref = t(PI_R).log()

    def grad(f):
        lp = torch.log_softmax(theta, 0)
        return torch.autograd.grad(f(lp), theta)[0]

    k3 = grpo.kl_k3(t(PI).log(), lref)
    reverse = sum(p * math.log(p / q) for p, q in zip(PI, PI_R))
    assert abs(float((t(PI) * k3).sum()) - reverse) < 1e-14
    g_k3 = grad(lambda lp: (lp.exp().detach() * grpo.kl_k3(lp, lref)).sum())
    g_fwd = grad(lambda lp: (lref.exp() * (lref - lp)).sum())
    g_rev = grad(lambda lp: (lp.exp() * (lp - lref)).sum())
    assert torch.allclose(g_k3, g_fwd, atol=1e-14, rtol=0)
    assert torch.allclose(g_fwd, t(PI) - t(PI_R), atol=1e-14)  # ∂/∂θ_k = π_k − π_ref,k
    log_ratio = [math.log(p / q) for p, q in zip(PI, PI_R)]
    assert torch.allclose(g_rev, t([p * (lr - reverse) for p, lr in zip(PI, log_ratio)]), atol=1e-14)
    assert (g_k3 - g_rev).abs().max() > 0.01


# --------------------------------------------------------------------------------------------
# the whole loss and each aggregation
# --------------------------------------------------------------------------------------------

LOGP = [[-1.0, -2.0, -0.5, -3.0], [-0.3, -0.4, -7.0, -7.0], [-2.0, -0.2, -1.1, -0.6]]
OLD = [[-1.2, -1.5, -0.9, -2.0], [0.0, -0.6, -1.0, -2.0], [-1.5, -0.2, -1.0, -0.9]]
REF = [[-0.8, -2.2, -0.6, -1.0], [-0.5, -0.3, -2.0, -1.0], [-2.5, -0.4, -0.9, -0.6]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
ADV = [0.8, -1.3, 0.4]


def _by_hand_per_token(level, beta, eps_low, eps_high):
    """ℓ_it as nested lists (padding included; the mask drops it later)."""
    out = []
    for lp, old, ref, m, a in zip(LOGP, OLD, REF, MASK, ADV):
        if level == "sequence":
            n = sum(m)
            seq = math.exp(sum(mi * (p - o) for p, o, mi in zip(lp, old, m)) / n)
            rhos = [seq] * len(lp)
        else:
            rhos = [math.exp(p - o) for p, o in zip(lp, old)]
        row = []
        for rho, p, r in zip(rhos, lp, ref):
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            k3 = math.exp(r - p) - (r - p) - 1
            row.append(-min(rho * a, clipped * a) + beta * k3)
        out.append(row)
    return out


def _by_hand_aggregate(per_token, loss_type, max_len=None, num_items=None):
    total = sum(x * m for row, mr in zip(per_token, MASK) for x, m in zip(row, mr))
    tokens = sum(map(sum, MASK))
    if loss_type == "grpo":
        return sum(sum(x * m for x, m in zip(row, mr)) / sum(mr) for row, mr in zip(per_token, MASK)) / 3
    if loss_type == "bnpo" or (loss_type == "dapo" and num_items is None):
        return total / tokens
    if loss_type == "dapo":
        return total / num_items
    return total / (3 * (4 if max_len is None else max_len))


AGGREGATIONS = [("grpo", {}), ("bnpo", {}), ("dapo", {}), ("dapo", {"num_items": 27.0}), ("dr_grpo", {})]
AGGREGATIONS += [("dr_grpo", {"max_len": 6})]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type,extra", AGGREGATIONS)
def test_policy_loss_by_hand(loss_type, extra, level):
    beta, eps_low, eps_high = 0.04, 0.2, 0.28
    want = _by_hand_aggregate(_by_hand_per_token(level, beta, eps_low, eps_high), loss_type, **extra)
    loss, metrics = grpo.policy_loss(
        t(LOGP),
        t(OLD),
        t(REF),
        t(ADV),
        t(MASK),
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=extra.get("max_len"),
        num_items_in_batch=extra.get("num_items"),
    )
    assert abs(float(loss) - want) < 1e-12, (float(loss), want)
    kl = [math.exp(r - p) - (r - p) - 1 for lp, rf, mr in zip(LOGP, REF, MASK) for p, r, m in zip(lp, rf, mr) if m]
    assert abs(float(metrics["kl"]) - sum(kl) / 9) < 1e-12
    assert float(metrics["completions/mean_length"]) == 3.0


def test_aggregate_numbers():
    """The four denominators on ℓ = 1 everywhere: each gives a plain count ratio."""
    ones, mask = torch.ones(3, 4, dtype=DT), t(MASK)  # lengths 3, 2, 4: 9 tokens
    assert float(grpo.aggregate(ones, mask, "grpo")) == 1.0
    assert float(grpo.aggregate(ones, mask, "bnpo")) == 1.0
    assert float(grpo.aggregate(ones, mask, "dapo", num_items_in_batch=36.0)) == 0.25  # 4 micro-batches like it
    assert float(grpo.aggregate(ones, mask, "dr_grpo", max_completion_length=6)) == 9 / 18
    # grpo weights sequences, bnpo tokens: ℓ = 1 on the 2-token sequence only
    only_short = t([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert float(grpo.aggregate(only_short, mask, "grpo")) == pytest.approx(1 / 3)
    assert float(grpo.aggregate(only_short, mask, "bnpo")) == pytest.approx(2 / 9)
    with pytest.raises(ValueError, match="loss_type"):
        grpo.aggregate(ones, mask, "token")


def test_bnpo_vs_dapo_under_accumulation():
    """Two micro-batches (9 and 2 tokens): averaging bnpo's per-micro-batch means is not the token
    mean of the whole batch; summing dapo's losses with the global count is."""
    lossA, maskA = t([[1.0, 1.0, 1.0, 0.0]] * 3), t([[1, 1, 1, 0]] * 3)
    lossB, maskB = t([[4.0, 4.0, 0.0, 0.0]]), t([[1, 1, 0, 0]])
    global_mean = (9 * 1.0 + 2 * 4.0) / 11
    bnpo = (grpo.aggregate(lossA, maskA, "bnpo") + grpo.aggregate(lossB, maskB, "bnpo")) / 2
    dapo = grpo.aggregate(lossA, maskA, "dapo", num_items_in_batch=11.0) + grpo.aggregate(
        lossB, maskB, "dapo", num_items_in_batch=11.0
    )
    assert float(bnpo) == pytest.approx(2.5) and abs(float(dapo) - global_mean) < 1e-12


def test_clip_metrics_by_hand():
    """Token level: ρ per token; sequence level: one flag per sequence (TRL's definitions)."""
    _, m = grpo.policy_loss(t(LOGP), t(OLD), None, t(ADV), t(MASK), epsilon_low=0.2, epsilon_high=0.28)
    low = high = 0
    for lp, old, mr, a in zip(LOGP, OLD, MASK, ADV):
        for p, o, mi in zip(lp, old, mr):
            rho = math.exp(p - o)
            low += mi * (rho < 0.8 and a < 0)
            high += mi * (rho > 1.28 and a > 0)
    assert (low, high) == (1, 2)  # hand check of the fixture: clipped tokens on both sides
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(low / 9)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(high / 9)
    assert float(m["clip_ratio/region_mean"]) == pytest.approx((low + high) / 9)
    assert "kl" not in m
    _, ms = grpo.policy_loss(
        t(LOGP), t(OLD), None, t(ADV), t(MASK), epsilon_low=0.2, importance_sampling_level="sequence"
    )
    # sequence ratios: exp(0.1/3) (A>0), exp(−0.1/2) (A<0), exp(−0.3/4) (A>0): nothing clipped
    assert float(ms["clip_ratio/region_mean"]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_dtypes(dtype):
    """Float-agnostic: the loss and its metrics keep the input dtype and match float64."""
    args = [torch.tensor(x, dtype=dtype) for x in (LOGP, OLD, REF, ADV, MASK)]
    kw = dict(beta=0.04, epsilon_high=0.28, loss_type="grpo")
    loss, m = grpo.policy_loss(*args, **kw)
    want, _ = grpo.policy_loss(*[a.double() for a in args], **kw)
    assert loss.dtype == dtype and m["kl"].dtype == dtype
    assert abs(float(loss) - float(want)) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_beta_zero_needs_no_reference_and_beta_needs_one():
    loss0, _ = grpo.policy_loss(t(LOGP), t(OLD), None, t(ADV), t(MASK), beta=0.0, loss_type="grpo")
    loss1, _ = grpo.policy_loss(t(LOGP), t(OLD), t(REF), t(ADV), t(MASK), beta=0.0, loss_type="grpo")
    assert float(loss0) == float(loss1)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.policy_loss(t(LOGP), t(OLD), None, t(ADV), t(MASK), beta=0.1)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_gradcheck(loss_type, level):
    """Off-policy, β > 0, no ratio on a clip edge (the loss is smooth there)."""
    logp = t(LOGP).requires_grad_(True)

    def f(lp):
        return grpo.policy_loss(
            lp, t(OLD), t(REF), t(ADV), t(MASK), beta=0.1, loss_type=loss_type, importance_sampling_level=level
        )[0]

    assert torch.autograd.gradcheck(f, (logp,))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_on_policy_gradient_is_policy_gradient(loss_type, level):
    """On-policy (old = current, first update): ρ = 1, nothing is clipped, and ∂L/∂logp_it =
    −A_i·m_it·w_i with the aggregation's weight w_i: 1/(N·L_i) grpo, 1/Σm bnpo, 1/num_items dapo,
    1/(N·max_len) dr_grpo. GSPO's sequence ratio gives the same gradient on-policy: ∂ρ_i/∂logp_it
    = m_it/L_i, and the sequence's term is repeated on its L_i tokens."""
    logp = t(LOGP).requires_grad_(True)
    loss, m = grpo.policy_loss(
        logp,
        None,
        None,
        t(ADV),
        t(MASK),
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=5,
        num_items_in_batch=20.0,
    )
    (g,) = torch.autograd.grad(loss, logp)
    lens = [sum(r) for r in MASK]
    tok_w = {"grpo": [1 / (3 * n) for n in lens], "bnpo": [1 / 9] * 3, "dapo": [1 / 20] * 3, "dr_grpo": [1 / 15] * 3}
    w = tok_w[loss_type]
    expect = [[-a * mi * wi for mi in mr] for a, mr, wi in zip(ADV, MASK, w)]
    assert torch.allclose(g, t(expect), atol=1e-14, rtol=0)
    assert float(m["clip_ratio/region_mean"]) == 0.0
    assert abs(float(loss.detach()) + _by_hand_aggregate([[a] * 4 for a in ADV], loss_type, 5, 20.0)) < 1e-14


# --------------------------------------------------------------------------------------------
# the exactly solvable bandit (issue 14, item 5)
# --------------------------------------------------------------------------------------------

K = 5
PI_REF = [0.10, 0.30, 0.20, 0.25, 0.15]  # test_tabular.py's problem
R = [1.0, -0.5, 0.4, -1.0, 0.2]
BETA = 0.5
BEST = 0
LREF, REW = t(PI_REF).log(), t(R)
ROWS: list[tuple[str, str, str]] = []  # (setting, fixed point, GD result)


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    if ROWS:
        print(f"\n\nGRPO on the bandit (K={K}, β={BETA}, π*_DPO = π_ref·exp(r/β)/Z = {fmt(pi_scaled(1.0))})")
        for row in ROWS:
            print("  ".join(row))


def fmt(pi):
    return "[" + ", ".join(f"{x:.4f}" for x in pi) + "]"


def softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


def pi_scaled(c, beta=BETA):
    """π ∝ π_ref·exp(c·r/β); c = 1 is π*_DPO."""
    return softmax([math.log(p) + c * r / beta for p, r in zip(PI_REF, R)])


def compositions(n, k=K):
    """All count vectors (n_1..n_k) with Σ = n (stars and bars)."""
    for bars in itertools.combinations(range(n + k - 1), k - 1):
        edges = (-1, *bars, n + k - 1)
        yield [b - a - 1 for a, b in zip(edges, edges[1:])]


class Groups:
    """Every group of G samples as a count vector, with one row per (group, response present):
    the response k, its count n_k and the advantage `grpo.group_advantages` gives it."""

    def __init__(self, G, scale):
        self.G = G
        counts = list(compositions(G))
        rewards = t([[R[k] for k in range(K) for _ in range(n[k])] for n in counts])
        adv, _ = grpo.group_advantages(rewards, scale)
        rows = []  # (group, response, its advantage, its count)
        for g, n in enumerate(counts):
            first = 0  # position of response k's first sample in the group's reward row
            for k in range(K):
                if n[k]:
                    rows.append((g, k, float(adv[g, first]), n[k]))
                first += n[k]
        group, resp, a, n_k = zip(*rows)
        self.counts = t(counts)
        self.log_coef = math.lgamma(G + 1) - torch.lgamma(self.counts + 1).sum(1)
        self.group, self.resp = torch.tensor(group), torch.tensor(resp)
        self.adv, self.n_k = t(a), t(n_k)

    def loss(self, theta, beta_k3=0.0):
        """The GRPO loss in exact expectation over groups y_1..y_G ~ π (on-policy, one update):
        each row weighted by P(group)·n_k/G with P multinomial under π (held fixed)."""
        lp = torch.log_softmax(theta, 0)
        p_group = torch.exp(self.log_coef + self.counts @ lp.detach())
        w = p_group[self.group] * self.n_k / self.G
        k = self.resp
        loss, _ = grpo.policy_loss(
            lp[k, None], None, LREF[k, None], self.adv, w[:, None], beta=beta_k3, loss_type="bnpo"
        )
        return loss


def population_loss(theta, std=False, beta_k3=0.0):
    """G → ∞: A(y) = r(y) − E_π[r] (divided by the population std σ_π when `std`), one row per
    response weighted by π(y)."""
    lp = torch.log_softmax(theta, 0)
    pi = lp.detach().exp()
    a = REW - pi @ REW
    if std:
        a = a / torch.sqrt(pi @ a**2)
    loss, _ = grpo.policy_loss(lp[:, None], None, LREF[:, None], a, pi[:, None], beta=beta_k3, loss_type="bnpo")
    return loss


def exact_kl(theta):
    """KL(π‖π_ref), exact."""
    lp = torch.log_softmax(theta, 0)
    return (lp.exp() * (lp - LREF)).sum()


def descend(objective, lr=2.0, tol=1e-13, max_steps=20000):
    """Gradient descent on θ from θ = log π_ref until the largest gradient entry is below `tol`."""
    theta = LREF.clone().requires_grad_(True)
    for step in range(max_steps):
        (g,) = torch.autograd.grad(objective(theta), theta)
        if g.abs().max() < tol:
            return torch.softmax(theta.detach(), 0).tolist(), step
        with torch.no_grad():
            theta -= lr * g
    raise AssertionError(f"gradient descent did not converge in {max_steps} steps")


def close(a, b, tol=1e-6):
    return max(abs(x - y) for x, y in zip(a, b)) < tol


def test_expected_gradient_is_scaled_policy_gradient():
    """No std: E[A_i ∇log π(y_i)] = (1 − 1/G)·∇E_π[r] — the group mean includes y_i's own reward,
    so a fraction 1/G of the policy gradient cancels; the other samples' part has mean 0."""
    theta = t([0.3, -1.0, 0.5, 0.2, -0.4])
    for G in (2, 4):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(Groups(G, "none").loss(th), th)
        th = theta.clone().requires_grad_(True)
        (pg,) = torch.autograd.grad(torch.softmax(th, 0) @ REW, th)
        assert torch.allclose(g, -(1 - 1 / G) * pg, atol=1e-14, rtol=0), G


def test_no_std_exact_kl_reaches_dpo_optimum():
    """No std normalisation, exact KL(π‖π_ref), the exact expected gradient with the population
    baseline (G → ∞): gradient descent reaches π*_DPO = π_ref·exp(r/β)/Z."""
    pi, steps = descend(lambda th: population_loss(th) + BETA * exact_kl(th))
    target = pi_scaled(1.0)
    ROWS.append(("no std, exact KL, G=∞", f"π*_DPO {fmt(target)}", f"GD {fmt(pi)} ({steps} steps)"))
    assert close(pi, target, 1e-9)


@pytest.mark.parametrize("G", [2, 4])
def test_no_std_exact_kl_finite_group(G):
    """With G samples the stationarity condition is π ∝ π_ref·exp(E[A | y]/β) and E[A | y] =
    (1 − 1/G)(r(y) − E_π r): the fixed point is π*_DPO at β·G/(G − 1), not at β."""
    groups = Groups(G, "none")
    pi, steps = descend(lambda th: groups.loss(th) + BETA * exact_kl(th))
    target = pi_scaled((G - 1) / G)
    ROWS.append((f"no std, exact KL, G={G}", f"π_ref·e^{{(1−1/G)r/β}} {fmt(target)}", f"GD {fmt(pi)} ({steps} steps)"))
    assert close(pi, target)
    assert not close(pi, pi_scaled(1.0), 0.05)


def forward_kl_fixed_point(c, beta=BETA):
    """β·∇KL(π_ref‖π) = c·∇E_π[r], i.e. β(π − π_ref) = c·π(r − E_π r): π_k = π_ref,k / (1 + c(m − r_k)/β)
    with m = E_π[r] fixed by Σ π = 1 (bisection on m > max r − β/c, where Σ falls from ∞ to 0)."""

    def mass(m):
        return sum(p / (1 + c * (m - r) / beta) for p, r in zip(PI_REF, R))

    lo, hi = max(R) - beta / c + 1e-15, max(R) + 100.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    m = 0.5 * (lo + hi)
    return [p / (1 + c * (m - r) / beta) for p, r in zip(PI_REF, R)]


@pytest.mark.parametrize("G", [4, "inf"])
def test_no_std_k3_in_the_loss_reaches_forward_kl_fixed_point(G):
    """β·k3 inside the loss on the sampled tokens (as TRL's GRPO and `policy_loss` do): its value
    is KL(π‖π_ref) in expectation, but its expected gradient is ∇KL(π_ref‖π) (see
    test_k3_expectation_is_reverse_kl_but_its_gradient_is_forward_kl). The fixed point is then
    not π*_DPO but π_k = π_ref,k / (1 − c(r_k − E_π r)/β), c = 1 − 1/G."""
    if G == "inf":
        c, expected = 1.0, population_loss
    else:
        c, expected = 1 - 1 / G, Groups(G, "none").loss
    pi, steps = descend(lambda th: expected(th, beta_k3=BETA))
    target = forward_kl_fixed_point(c)
    ROWS.append((f"no std, k3 in loss, G={G}", f"π_ref/(1−c(r−r̄)/β) {fmt(target)}", f"GD {fmt(pi)} ({steps} steps)"))
    assert abs(sum(target) - 1) < 1e-12
    assert close(pi, target)
    assert not close(pi, pi_scaled(c), 0.02)


def expected_std_advantages(pi, G, eps=grpo.STD_EPS):
    """Ā_k = E[A_1 | y_1 = k] with A = (r − group mean)/(unbiased group std + eps), the other G − 1
    samples ~ π enumerated (plain Python, independent of `group_advantages`)."""
    out = []
    for k in range(K):
        total = 0.0
        for n in compositions(G - 1):
            p = math.factorial(G - 1) * math.prod(q**c / math.factorial(c) for q, c in zip(pi, n))
            rs = [R[k]] + [R[j] for j in range(K) for _ in range(n[j])]
            total += p * (R[k] - sum(rs) / G) / (statistics.stdev(rs) + eps)
        out.append(total)
    return out


def std_fixed_point(G, beta=BETA, damping=0.5, tol=1e-14):
    """Stationarity with exact KL(π‖π_ref): the expected gradient of the surrogate in θ_k is
    π_k·Ā_k(π) (advantages sum to 0 in a group), that of KL is π_k(log(π_k/π_ref,k) − KL), so
    π = softmax(log π_ref + Ā(π)/β). Solved by damped fixed-point iteration."""
    pi = list(PI_REF)
    for _ in range(10000):
        new = softmax([math.log(p) + a / beta for p, a in zip(PI_REF, expected_std_advantages(pi, G))])
        if max(abs(a - b) for a, b in zip(new, pi)) < tol:
            return new
        pi = [(1 - damping) * a + damping * b for a, b in zip(pi, new)]
    raise AssertionError("no convergence")


@pytest.mark.parametrize("G", [2, 4])
def test_group_std_fixed_point(G):
    """Std normalisation (scale="group", sample std inside the expectation), exact KL: gradient
    descent reaches π = softmax(log π_ref + Ā(π)/β) — more peaked than π*_DPO, increasingly so
    with G (the normalised advantage of a rare good response grows like √G)."""
    target = std_fixed_point(G)
    groups = Groups(G, "group")
    pi, steps = descend(lambda th: groups.loss(th) + BETA * exact_kl(th), lr=1.0)
    ROWS.append(
        (f"group std, exact KL, G={G}", f"softmax(log π_ref+Ā/β) {fmt(target)}", f"GD {fmt(pi)} ({steps} steps)")
    )
    assert close(pi, target)


def population_std(pi):
    m = sum(p * r for p, r in zip(pi, R))
    return math.sqrt(sum(p * (r - m) ** 2 for p, r in zip(pi, R)))


def population_std_fixed_points(beta, grid=4000, top=4.0):
    """G → ∞ with the population std σ_π: A = (r − E_π r)/σ_π, so the fixed point with exact KL is
    π(s) ∝ π_ref·exp(r/(β·s)) with s = σ_{π(s)}. Returns the roots s of σ_{π(s)} − s on (0, top]
    (grid scan, then bisection)."""

    def h(s):
        return population_std(pi_scaled(1 / s, beta)) - s

    roots, ss = [], [top * (i + 1) / grid for i in range(grid)]
    for a, b in zip(ss, ss[1:]):
        if (h(a) > 0) != (h(b) > 0):
            for _ in range(100):
                mid = 0.5 * (a + b)
                a, b = (mid, b) if (h(mid) > 0) == (h(a) > 0) else (a, mid)
            roots.append(0.5 * (a + b))
    return roots


def test_population_std_collapses_at_beta_half():
    """G → ∞, std normalisation, β = 0.5: σ_{π(s)} < s for every s, so there is no interior fixed
    point — as π concentrates, σ_π → 0 and the normalised advantages grow faster than the KL can
    hold them. Gradient descent runs to the best response (π(best) → 1). With finite G the
    advantage is bounded by (G − 1)/√G and the fixed point exists (test_group_std_fixed_point),
    moving towards this collapse as G grows."""
    assert population_std_fixed_points(BETA) == []
    # the threshold: interior fixed points exist from β ≈ 0.871 (min over u of u/σ_{π ∝ π_ref·e^{r/u}})
    assert population_std_fixed_points(0.86) == [] and len(population_std_fixed_points(0.88)) == 2
    theta = LREF.clone().requires_grad_(True)
    for _ in range(300):
        (g,) = torch.autograd.grad(population_loss(theta, std=True) + BETA * exact_kl(theta), theta)
        with torch.no_grad():
            theta -= g
    pi = torch.softmax(theta.detach(), 0).tolist()
    ROWS.append(("population std, exact KL, G=∞", "no interior fixed point (β < 0.871)", f"GD 300 steps {fmt(pi)}"))
    assert pi[BEST] > 0.999


def test_population_std_fixed_point_at_larger_beta():
    """β = 2: σ_{π(s)} = s has two roots (near s = 0.053 and 0.648); gradient descent from π_ref
    reaches the larger one, π ∝ π_ref·exp(r/(β·σ_π)), σ_π = 0.648."""
    beta = 2.0
    roots = population_std_fixed_points(beta)
    assert len(roots) == 2 and abs(roots[0] - 0.053) < 0.001 and abs(roots[1] - 0.648) < 0.001
    target = pi_scaled(1 / roots[1], beta)
    pi, steps = descend(lambda th: population_loss(th, std=True) + beta * exact_kl(th), lr=1.0)
    ROWS.append(
        ("population std, exact KL, G=∞, β=2", f"σ={roots[1]:.4f} {fmt(target)}", f"GD {fmt(pi)} ({steps} steps)")
    )
    assert close(pi, target)
