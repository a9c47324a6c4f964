"""Assignment A4 (JPO's loss pieces, assignments/A4-jpo.md): the autograder. `python -m pytest -m a4`.

Hand-computed values with padding masks, interleaved groups, both signs of the advantage and
ratios away from 1 (at ratio 1 the k3 term and its gradient vanish, so tests there cannot see
a wrong KL); the k3 estimator's expectation under pi is checked to be KL(pi || pi_ref), not the
reverse, and its gradient is checked off the reference."""
import math

import pytest
import torch

import jpo

pytestmark = pytest.mark.a4


# ----------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    # group a: 1, 3, 5 -> mean 3, sample std 2 -> -1, 0, 1 ; group b: 10, 30 -> mean 20, std 14.142
    adv = jpo.group_advantages([1, 10, 3, 30, 5], ["a", "b", "a", "b", "a"], clip=5.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, -s, 0.0, s, 1.0]))
    assert adv.dtype == torch.float32


def test_group_advantages_clip_and_degenerate_groups():
    # nine 0s and one 100: mean 10, sample std sqrt((9 * 100 + 8100) / 9) = sqrt(1000)
    r = [0.0] * 9 + [100.0]
    z = 90 / math.sqrt(1000)                                          # 2.846
    for clip in (2.0, 2.5, 10.0):
        adv = jpo.group_advantages(r, ["g"] * 10, clip=clip)
        assert adv[-1].item() == pytest.approx(min(z, clip), rel=1e-5)
        assert adv[0].item() == pytest.approx(-10 / math.sqrt(1000), rel=1e-5)
    # a group of one and a group of equal rewards carry no preference: 0, never NaN
    adv = jpo.group_advantages([7.0, 4.0, 4.0, 4.0, 1.0, 2.0], [0, 1, 1, 1, 2, 2], clip=2.0)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv[4:], torch.tensor([-s_two(), s_two()]))


def s_two():
    """(x - mean) / sample std for two values: +-1/sqrt(2)."""
    return 1 / math.sqrt(2)


def test_group_advantages_normalise_within_each_group_not_the_batch():
    """Two groups on very different scales: each gets mean 0 and std 1 on its own."""
    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(6, generator=g), 100 + 50 * torch.randn(6, generator=g)
    r = torch.stack([small, big], 1).reshape(-1)                     # interleaved: s, b, s, b, ...
    keys = ["s", "b"] * 6
    adv = jpo.group_advantages(r.tolist(), keys, clip=10.0)
    for x, k in ((small, "s"), (big, "b")):
        a = adv[[i for i, kk in enumerate(keys) if kk == k]]
        torch.testing.assert_close(a, (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-5)
        assert a.mean().item() == pytest.approx(0.0, abs=1e-5) and a.std().item() == pytest.approx(1.0, rel=1e-5)


# ----------------------------------------------------------------------------------------
# sequence_ratio
# ----------------------------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0, -0.5, -9.0],
                     [-0.3, -0.2, -4.0, -4.0],
                     [-2.0, -1.0, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -1.0, -0.5, 3.0],
                    [-0.1, -0.9, 5.0, 5.0],
                    [-1.0, -2.0, -3.0, -0.5]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)   # padding holds junk


def test_sequence_ratio_by_hand():
    # per-token log pi - log pi_ref on the mask: row 0: 0.5, -1, 0 ; row 1: -0.2, 0.7 ; row 2: -1, 1, 2, -0.5
    want = torch.tensor([math.exp(-0.5 / 3), math.exp(0.5 / 2), math.exp(1.5 / 4)])
    torch.testing.assert_close(jpo.sequence_ratio(LOGP, REF, MASK), want)
    torch.testing.assert_close(jpo.sequence_ratio(LOGP, REF, MASK.float()), want)
    assert jpo.sequence_ratio(REF, REF, MASK).tolist() == [1.0, 1.0, 1.0]
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert jpo.sequence_ratio(LOGP[:1], REF[:1], empty).tolist() == [1.0]   # no tokens: ratio 1, not NaN


# ----------------------------------------------------------------------------------------
# clipped_surrogate
# ----------------------------------------------------------------------------------------

def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 1.05])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0, 0.0])
    # eps 0.2: min(rho A, clip(rho, 0.8, 1.2) A) = 1.2 | -1.5 | 0.5 | -0.8 | 2.2 | -1.8 | 0 ; loss = minus that
    torch.testing.assert_close(jpo.clipped_surrogate(ratio, adv, 0.2),
                               torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2, 1.8, 0.0]))
    # eps 0.05: clip(rho, 0.95, 1.05): 1.05 | -1.5 | 0.5 | -0.95 | 2.1 | -1.9 | 0
    torch.testing.assert_close(jpo.clipped_surrogate(ratio, adv, 0.05),
                               torch.tensor([-1.05, 1.5, -0.5, 0.95, -2.1, 1.9, 0.0]))


def test_clipped_surrogate_gradient_stops_outside_the_trust_region():
    """d loss / d rho is -A inside the clip range and where clipping would not help, 0 where
    the clipped term is the smaller one (the update has gone far enough)."""
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    jpo.clipped_surrogate(ratio, adv, 0.2).sum().backward()
    assert ratio.grad.tolist() == [0.0, 1.0, -1.0, 0.0, -2.0]


# ----------------------------------------------------------------------------------------
# k3_kl
# ----------------------------------------------------------------------------------------

def k3(d):
    return math.exp(d) - d - 1


def test_k3_by_hand():
    # d = log pi_ref - log pi on the mask: row 0: -0.5, 1, 0 ; row 1: 0.2, -0.7 ; row 2: 1, -1, -2, 0.5
    want = torch.tensor([(k3(-0.5) + k3(1.0) + k3(0.0)) / 3, (k3(0.2) + k3(-0.7)) / 2,
                         (k3(1.0) + k3(-1.0) + k3(-2.0) + k3(0.5)) / 4])
    torch.testing.assert_close(jpo.k3_kl(LOGP, REF, MASK), want)
    assert jpo.k3_kl(REF, REF, MASK).tolist() == [0.0, 0.0, 0.0]
    assert (jpo.k3_kl(LOGP, REF, MASK) > 0).all()
    assert jpo.k3_kl(LOGP[:1], REF[:1], torch.zeros(1, 4, dtype=torch.bool)).tolist() == [0.0]


def test_k3_expectation_is_kl_pi_to_ref_not_the_reverse():
    """Sampling y ~ pi and averaging k3 gives KL(pi || pi_ref) in expectation: computed exactly
    here by weighting every token of a 5-token vocabulary by pi(y)."""
    pi = torch.tensor([0.9, 0.05, 0.03, 0.01, 0.01])
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    per_token = jpo.k3_kl(pi.log()[:, None], ref.log()[:, None], torch.ones(5, 1, dtype=torch.bool))   # (5,)
    expected = (pi * per_token).sum().item()
    kl_pi_ref = (pi * (pi / ref).log()).sum().item()
    kl_ref_pi = (ref * (ref / pi).log()).sum().item()
    assert expected == pytest.approx(kl_pi_ref, rel=1e-5)
    assert kl_ref_pi - kl_pi_ref > 0.3                               # the two directions really differ here


def test_k3_gradient_away_from_the_reference():
    """d k3 / d log pi(y_t) = (1 - exp(log pi_ref - log pi)) / n per masked token: it pulls log pi
    back toward log pi_ref from either side, and is 0 only at equality (where JPO's step 0 is)."""
    logp = LOGP.clone().requires_grad_(True)
    jpo.k3_kl(logp, REF, MASK).sum().backward()
    n = MASK.sum(1, keepdim=True).float()
    want = (1 - torch.exp(REF - LOGP)) / n * MASK
    torch.testing.assert_close(logp.grad, want)
    assert logp.grad[0, 1] < 0 < logp.grad[0, 0]      # pi above ref (token 0): descent lowers log pi; below (1): raises it


def test_sequence_ratio_gradient():
    """d rho / d log pi(y_t) = rho / n on each masked token, 0 on padding."""
    logp = LOGP.clone().requires_grad_(True)
    rho = jpo.sequence_ratio(logp, REF, MASK)
    rho.sum().backward()
    n = MASK.sum(1, keepdim=True).float()
    torch.testing.assert_close(logp.grad, (rho.detach()[:, None] / n) * MASK)
