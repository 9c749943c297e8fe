"""docs/contributing.md's worked example, run: the example loss (`dpo_offset`, DPO with a constant
margin γ) is executed from the page and checked the three ways the page asks of every new loss:
hand-computed values, its gradient, and the optimum it reaches on the tabular problem.

The loss is registered with the page's own `_spec(...)` line into `losses.REGISTRY` through
monkeypatch, so it is there for one test at a time and never seen by the other test files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import test_loss_family as family
import test_tabular as tab
import torch

from prefopt import config, losses

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"
NAME = "dpo_offset"
DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids OpenMP contention on a shared machine
    yield
    torch.set_num_threads(threads)


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def the_block(text: str, defines: str) -> str:
    """The one python block of `text` that defines `defines`."""
    found = [b for b in python_blocks(text) if f"def {defines}(" in b]
    assert len(found) == 1, f"docs/contributing.md: expected one python block defining {defines}, found {len(found)}"
    return found[0]


def example_spec() -> losses.LossSpec:
    """The page's loss function, executed where it is meant to live (the namespace of
    prefopt.losses), registered with the page's `_spec(...)` line."""
    text = DOC.read_text(encoding="utf-8")
    namespace = dict(vars(losses))
    exec(compile(the_block(text, NAME), f"{DOC}:{NAME}", "exec"), namespace)
    line = re.search(rf'^\s*(_spec\("{NAME}", {NAME}\)),\s*$', text, re.M)
    assert line, f'docs/contributing.md: no registration line _spec("{NAME}", {NAME}),'
    return eval(line.group(1), namespace)


def example_reference():
    """The page's math-only reference for tests/test_loss_family.py, in that file's namespace."""
    namespace = dict(vars(family))
    exec(compile(the_block(DOC.read_text(encoding="utf-8"), f"ref_{NAME}"), str(DOC), "exec"), namespace)
    return namespace[f"ref_{NAME}"]


@pytest.fixture
def spec(monkeypatch):
    s = example_spec()
    monkeypatch.setitem(losses.REGISTRY, s.name, s)
    return s


def t(x):
    return torch.tensor(x, dtype=DT)


# --------------------------------------------------------------------------------------------
# registration: a loss is usable from the registry and the config once its _spec line exists
# --------------------------------------------------------------------------------------------


def test_registered_like_any_loss(spec):
    assert losses.get(NAME) is spec and NAME in losses.names(paired=True, needs_reference=True)
    assert spec.hyperparameters == {"beta": 0.1, "gamma": 1.0}  # read from the signature
    assert spec.needs_reference and spec.paired and spec.per_pair
    assert not (spec.stateful or spec.kl_baseline or spec.reward_is_per_token())
    assert set(spec.hyperparameters) <= family.CONFIG_KEYS  # LossConfig has them: no config change
    assert "−log σ(β·h − γ)" in spec.fn.__doc__
    assert losses.reward_formula(spec, spec.hyperparameters) == "β·(log π − log π_ref)"
    cfg = config.load(None, ["--loss.name", NAME, "--loss.gamma", "0.5"])
    assert config.resolve_loss(cfg.loss) is spec and (cfg.loss.beta, cfg.loss.gamma) == (0.1, 0.5)


def test_registry_is_left_alone():
    assert NAME not in losses.REGISTRY  # the fixture's registration is undone after each test


# --------------------------------------------------------------------------------------------
# (a) hand-computed values
# --------------------------------------------------------------------------------------------


def test_hand_computed_values(spec):
    # h = (−3 − (−4)) − (−6 − (−5)) = 2; β = 0.5, γ = 1: β·h − γ = 0, so L = −log σ(0) = log 2
    out = spec.fn(t([-3.0]), t([-6.0]), t([-4.0]), t([-5.0]), beta=0.5, gamma=1.0)
    assert out.item() == pytest.approx(math.log(2), rel=1e-15)
    # β·h − γ = log 3: L = log(1 + 1/3) = log(4/3)
    out = spec.fn(t([-3.0]), t([-6.0]), t([-4.0]), t([-5.0]), beta=0.5, gamma=1.0 - math.log(3))
    assert out.item() == pytest.approx(math.log(4 / 3), rel=1e-14)
    # defaults β = 0.1, γ = 1 and h = 0: L = −log σ(−1) = log(1 + e)
    assert spec.fn(t([-2.0]), t([-2.0]), t([-2.0]), t([-2.0])).item() == pytest.approx(math.log1p(math.e), rel=1e-15)


@pytest.mark.parametrize("kw", [{}, dict(beta=0.5, gamma=0.0), dict(beta=0.3, gamma=2.0)])
@pytest.mark.parametrize("k", [0, 1])
def test_matches_the_pages_math_reference(spec, kw, k):
    """The reference the page adds to tests/test_loss_family.py, on that file's inputs."""
    d = family.PAIRED_INPUTS[k]
    out, _ = family.run(spec, d, **kw)
    assert out.tolist() == pytest.approx(example_reference()(d, **kw), rel=1e-12)


def test_gamma_zero_is_dpo(spec):
    d = family.PAIRED_INPUTS[0]
    out, _ = family.run(spec, d, beta=0.3, gamma=0.0)
    dpo, _ = family.run(losses.get("sigmoid"), d, beta=0.3)
    assert torch.equal(out, dpo)


# --------------------------------------------------------------------------------------------
# (b) the gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1])
def test_gradcheck(spec, k):
    d = family.PAIRED_INPUTS[k]
    rc, rr = t(d["rc"]), t(d["rr"])
    args = (t(d["lc"]).requires_grad_(), t(d["lr"]).requires_grad_())
    assert torch.autograd.gradcheck(lambda lc, lr: spec.fn(lc, lr, rc, rr, beta=0.3, gamma=0.7), args)


@pytest.mark.parametrize("beta,gamma", [(0.1, 1.0), (0.5, 0.0), (2.0, 3.0)])
def test_analytic_gradient(spec, beta, gamma):
    """∂L/∂logp_c = −β·σ(γ − β·h) = −∂L/∂logp_r."""
    for d in family.PAIRED_INPUTS:
        out, (lc, lr) = family.run(spec, d, grad=True, beta=beta, gamma=gamma)
        g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
        for i in family.pairs(d):
            s = family.sig(gamma - beta * family._h(d, i))
            assert g_c[i].item() == pytest.approx(-beta * s, rel=1e-12)
            assert g_r[i].item() == pytest.approx(beta * s, rel=1e-12)


# --------------------------------------------------------------------------------------------
# (c) the tabular problem (tests/test_tabular.py's machinery)
# --------------------------------------------------------------------------------------------


def test_tabular_gamma_zero_reaches_dpo_optimum(spec):
    pi = tab.lbfgs(tab.paired_population(spec, beta=tab.BETA, gamma=0.0))
    assert tab.kl(tab.PI_STAR, pi) < 1e-9


def offset_optimum(p: float, beta: float, gamma: float, pi_ref: list[float]) -> torch.Tensor:
    """Two responses, y0 preferred with probability p: d = β(g(y0) − g(y1)) at the optimum is
    log a, a the positive root of (1−p)·a² + e^γ·(1 − 2p)·a − p = 0; π ∝ π_ref·exp(g)."""
    b = math.exp(gamma) * (1 - 2 * p)
    a = (-b + math.sqrt(b * b + 4 * (1 - p) * p)) / (2 * (1 - p))
    odds = pi_ref[0] / pi_ref[1] * a ** (1 / beta)
    return t([odds / (1 + odds), 1 / (1 + odds)])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_tabular_two_responses_reach_closed_form(spec, gamma):
    pi_ref, r = [0.7, 0.3], [0.4, -0.6]  # the reference prefers y0 less than the rewards do
    lref = t(pi_ref).log()
    p = 1 / (1 + math.exp(-(r[0] - r[1])))  # Bradley–Terry
    w, yw, yl = t([p, 1 - p]), torch.tensor([0, 1]), torch.tensor([1, 0])  # both labels of the pair

    def population(theta):
        lp = torch.log_softmax(theta, 0)
        return (w * spec.fn(lp[yw], lp[yl], lref[yw], lref[yl], beta=tab.BETA, gamma=gamma)).sum()

    pi = tab.lbfgs(population, init=lref)
    target = offset_optimum(p, tab.BETA, gamma, pi_ref)
    assert tab.kl(target, pi) < 1e-9, (pi.tolist(), target.tolist())
    if gamma == 0.0:  # DPO's optimum π_ref·exp(r/β)/Z
        assert tab.kl(torch.softmax(lref + t(r) / tab.BETA, 0), pi) < 1e-9


def test_tabular_direction_with_a_margin(spec):
    """What tests/test_tabular.py's test_direction asks of a new paired loss, for γ > 0."""
    pi = tab.lbfgs(tab.paired_population(spec, beta=tab.BETA, gamma=0.25))
    assert pi[tab.BEST] > tab.PREF[tab.BEST] + 0.01 and pi[tab.WORST] < tab.PREF[tab.WORST] - 0.01
    assert float(pi @ tab.REW) > float(tab.PREF @ tab.REW)
