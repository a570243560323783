"""Tests for anadp.audit_one_run: the one-run epsilon bound against its closed
form and its exact coverage under the worst eps-DP guesser, its monotonicity,
and the canary, inclusion and membership-metric helpers."""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats

from anadp import audit_one_run as aor

# --- the bound from counts ------------------------------------------------------------


def test_perfect_guesser_matches_closed_form_and_grows_with_guesses():
    # 500 guesses, all right, out of m = 1000 canaries: q^500 = 0.05 at q = 0.05^(1/500),
    # so the bound is logit(0.05^(1/500)) = log(166.4...) = 5.11.
    bound = aor.epsilon_lower_bound(500, 500, confidence=0.95, num_canaries=1000)
    assert 5.05 < bound < 5.2
    assert bound == pytest.approx(aor.perfect_guesser_bound(500, confidence=0.95), abs=1e-8)
    q = aor.guess_accuracy(bound)
    assert q**500 == pytest.approx(0.05, rel=1e-6)
    bounds = [aor.epsilon_lower_bound(r, r, num_canaries=1000) for r in (10, 50, 100, 200, 500, 1000)]
    assert all(b < c for b, c in zip(bounds, bounds[1:]))
    # About log(r / log(1 / beta)) for large r.
    assert bounds[-1] == pytest.approx(math.log(1000 / math.log(20)), abs=0.01)


def test_no_better_than_a_coin_gives_zero():
    assert aor.epsilon_lower_bound(1000, 500) == 0.0
    assert aor.epsilon_lower_bound(1000, 400) == 0.0
    assert aor.epsilon_lower_bound(0, 0) == 0.0
    # 525 of 1000 is not significant at 95% (one-sided binomial p = 0.06), 530 is.
    assert scipy.stats.binom.sf(524, 1000, 0.5) > 0.05
    assert aor.epsilon_lower_bound(1000, 525) == 0.0
    assert aor.epsilon_lower_bound(1000, 530) > 0.0


def test_bound_is_where_the_binomial_tail_equals_beta():
    r, v, beta = 1000, 700, 0.05
    eps = aor.epsilon_lower_bound(r, v, confidence=1 - beta)
    assert scipy.stats.binom.sf(v - 1, r, scipy.special.expit(eps)) == pytest.approx(beta, rel=1e-6)
    assert 0.6 < eps < math.log(0.7 / 0.3)  # below the plug-in logit of the observed accuracy


@pytest.mark.parametrize("r", [1, 20, 500])
def test_monotone_in_num_correct(r):
    bounds = [aor.epsilon_lower_bound(r, v) for v in range(r + 1)]
    assert all(b <= c for b, c in zip(bounds, bounds[1:]))
    assert bounds[0] == 0.0
    if r > 1:
        assert bounds[-1] > bounds[-2]


def test_higher_confidence_gives_smaller_bound():
    for r, v in [(100, 80), (1000, 700), (500, 500)]:
        strict = aor.epsilon_lower_bound(r, v, confidence=0.95)
        loose = aor.epsilon_lower_bound(r, v, confidence=0.5)
        assert 0 < strict < loose
    # At confidence 0.5 the bound is close to the plug-in logit of the accuracy.
    assert aor.epsilon_lower_bound(1000, 700, confidence=0.5) == pytest.approx(math.log(0.7 / 0.3), abs=0.01)


@pytest.mark.parametrize("r", [100, 1000])
@pytest.mark.parametrize("eps", [0.5, 2.0, 4.0])
def test_exact_coverage_under_randomized_response(r, eps):
    # The worst eps-DP guesser is randomised response: v ~ Bin(r, q(eps)). The bound
    # is nondecreasing in v, so it overstates eps exactly when v >= v0 for the
    # smallest such v0; that event must have probability <= beta, and for large r
    # close to beta (the bound is not needlessly conservative).
    beta = 0.05
    q = scipy.special.expit(eps)
    over = [v for v in range(r + 1) if aor.epsilon_lower_bound(r, v, confidence=1 - beta) > eps]
    if not over:  # 100 guesses certify at most logit(0.05^(1/100)) = 3.5 < 4
        assert aor.perfect_guesser_bound(r) < eps
        return
    v0 = min(over)
    assert over == list(range(v0, r + 1))
    p_over = scipy.stats.binom.sf(v0 - 1, r, q)
    assert p_over <= beta
    if r == 1000:
        assert p_over > 0.02


def _p_value_by_definition(r, v, eps, delta, m):
    """The theorem's right-hand side term by term, with Bin(r, q) itself (no wrong-guess counts)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = scipy.stats.binom.sf(v - 1, r, q)
    windows = [(scipy.stats.binom.sf(v - i - 1, r, q) - tail) / i for i in range(1, m + 1)]
    return min(1.0, tail + 2 * m * delta * max(windows))


@pytest.mark.parametrize(("r", "v", "eps"), [(50, 40, 0.8), (200, 200, 3.0), (200, 150, 0.5), (30, 1, 0.0)])
@pytest.mark.parametrize("delta", [0.0, 1e-4, 2e-3])
def test_p_value_matches_the_theorem_term_by_term(r, v, eps, delta):
    m = 250
    assert aor.one_run_p_value(r, v, eps, delta=delta, num_canaries=m) == pytest.approx(
        _p_value_by_definition(r, v, eps, delta, m), rel=1e-9, abs=1e-15
    )


def test_delta_correction_lowers_the_bound_a_little_for_small_delta():
    m = 1000
    for r, v in [(500, 500), (1000, 700), (1000, 880)]:
        bounds = [aor.epsilon_lower_bound(r, v, delta=d, num_canaries=m) for d in (0.0, 1e-7, 1e-5, 1e-4, 5e-4)]
        assert all(b >= c for b, c in zip(bounds, bounds[1:]))
        assert bounds[0] - bounds[2] < 0.05  # delta = 1e-5 << 1 / m costs little
        assert bounds[-1] < bounds[0]
    # Perfect guesser: the i = 1 window P[W' = r - 1] = r q^(r-1) (1 - q) is about 0.15 at the
    # delta = 0 bound, so with 2 m delta = 0.02 the tail q^r must drop to about 0.047.
    eps = aor.epsilon_lower_bound(500, 500, delta=1e-5, num_canaries=m)
    assert aor.one_run_p_value(500, 500, eps, delta=1e-5, num_canaries=m) == pytest.approx(0.05, rel=1e-6)
    q = aor.guess_accuracy(eps)
    assert 0.044 < q**500 < 0.049


@pytest.mark.parametrize("delta", [1e-5, 5e-4])
def test_delta_bound_monotone_in_num_correct_and_p_value_in_epsilon(delta):
    m, r = 1000, 300
    bounds = [aor.epsilon_lower_bound(r, v, delta=delta, num_canaries=m) for v in range(0, r + 1, 3)]
    assert all(b <= c for b, c in zip(bounds, bounds[1:]))
    # The monotonicity that bisection relies on, at the largest delta allowed (2 m delta = 1) too.
    for d in (delta, 0.5 / m):
        for v in (150, 240, 299, 300):
            p = [aor.one_run_p_value(r, v, e, delta=d, num_canaries=m) for e in np.linspace(0, 8, 161)]
            assert all(a <= b + 1e-15 for a, b in zip(p, p[1:]))


def test_count_and_confidence_validation():
    with pytest.raises(ValueError, match="num_correct=11"):
        aor.epsilon_lower_bound(10, 11)
    with pytest.raises(ValueError, match="num_guesses=-1"):
        aor.epsilon_lower_bound(-1, 0)
    with pytest.raises(ValueError, match="num_canaries=5"):
        aor.epsilon_lower_bound(10, 3, num_canaries=5)
    with pytest.raises(ValueError, match="confidence=1.0"):
        aor.epsilon_lower_bound(10, 3, confidence=1.0)
    with pytest.raises(ValueError, match="delta=1.0"):
        aor.epsilon_lower_bound(10, 3, delta=1.0)
    with pytest.raises(ValueError, match="epsilon=-1"):
        aor.one_run_p_value(10, 3, -1.0)
    with pytest.raises(ValueError, match="needs num_canaries"):
        aor.epsilon_lower_bound(10, 3, delta=1e-5)
    with pytest.raises(ValueError, match=r"delta=0.001 must be in \[0, 1 / \(2 num_canaries\)\]"):
        aor.epsilon_lower_bound(10, 3, delta=1e-3, num_canaries=1000)


# --- from scores to guesses --------------------------------------------------------------

KS = (100, 200, 500, 1000)


def _randomized_response_scores(eps, m, seed):
    """Inclusion bits and scores that see each bit through eps-DP randomised response.

    Each bit is flipped with probability 1 / (1 + e^eps); a uniform jitter in
    [0, 0.5) breaks ties at random without reordering observed 1s and 0s.
    """
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    flipped = rng.random(m) < 1 / (1 + math.exp(eps))
    return (included ^ flipped) + 0.5 * rng.random(m), included


def test_top_bottom_correct_by_hand():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True, True])
    # Ranked by score (ties by index): 0 (in), 3 (out), 2 (out), 5 (in), 4 (in), 1 (out).
    assert aor.top_bottom_correct(scores, included, 2) == 2  # 0 "in" right, 1 "out" right
    assert aor.top_bottom_correct(scores, included, 4) == 2  # 3 "in" wrong, 4 "out" wrong
    assert aor.top_bottom_correct(scores, included, 6) == 2  # "in" for 0, 3, 2; "out" for 5, 4, 1
    # Ties go by index: reversed, the tied canaries 2 and 5 trade places and 5 (in) joins the top 3.
    assert aor.top_bottom_correct(scores[::-1], included[::-1], 6) == 4
    with pytest.raises(ValueError, match=r"k=3 must be an even integer in \[2, 6\]"):
        aor.top_bottom_correct(scores, included, 3)
    with pytest.raises(ValueError, match="k=8"):
        aor.top_bottom_correct(scores, included, 8)


def test_best_bound_perfect_scores_uses_bonferroni_confidence():
    rng = np.random.default_rng(0)
    m = 1000
    included = rng.random(m) < 0.5
    assert 450 < included.sum() < 550
    eps, k = aor.best_lower_bound(included.astype(float), included, ks=KS, confidence=0.95)
    # k = 500 is the largest all-correct guess count; k = 1000 must guess a few wrong.
    assert k == 500
    assert eps == pytest.approx(aor.perfect_guesser_bound(500, confidence=1 - 0.05 / len(KS)), abs=1e-8)
    assert 4.6 < eps < aor.perfect_guesser_bound(500, confidence=0.95)
    # One k alone pays no correction.
    alone, _ = aor.best_lower_bound(included.astype(float), included, ks=[500], confidence=0.95)
    assert alone == pytest.approx(aor.perfect_guesser_bound(500, confidence=0.95), abs=1e-8)


def test_best_bound_is_the_max_of_split_confidence_bounds():
    scores, included = _randomized_response_scores(1.0, 1000, seed=3)
    eps, k = aor.best_lower_bound(scores, included, ks=KS, delta=1e-5, confidence=0.9)
    each = [
        aor.epsilon_lower_bound(
            kk, aor.top_bottom_correct(scores, included, kk), delta=1e-5, confidence=1 - 0.1 / 4, num_canaries=1000
        )
        for kk in KS
    ]
    assert eps == max(each) and k == KS[int(np.argmax(each))]
    assert eps > 0


def test_coin_flip_scores_give_a_bound_near_zero():
    included = aor.draw_inclusion(1000, seed=1)
    scores = np.random.default_rng(1).normal(size=1000)
    eps, _ = aor.best_lower_bound(scores, included, ks=KS)
    assert 0.0 <= eps < 0.3


def test_randomized_response_bound_is_valid_and_not_far_below():
    eps_true, m = 2.0, 1000
    bounds = []
    for seed in range(20):
        scores, included = _randomized_response_scores(eps_true, m, seed=100 + seed)
        bounds.append(aor.best_lower_bound(scores, included, ks=(200, 400, 600, 800, 1000))[0])
    bounds = np.array(bounds)
    assert np.all(bounds <= eps_true)
    assert np.all(bounds > eps_true / 3)
    assert 1.2 < bounds.mean() < eps_true  # about 1.7: accuracy 0.88 on 1000 guesses, less a margin


def test_best_bound_validation():
    scores, included = np.zeros(10), np.zeros(10, bool)
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        aor.best_lower_bound(scores, included[:5], ks=[2])
    with pytest.raises(ValueError, match="boolean"):
        aor.best_lower_bound(scores, included.astype(int), ks=[2])
    with pytest.raises(ValueError, match="finite"):
        aor.best_lower_bound(np.full(10, np.nan), included, ks=[2])
    with pytest.raises(ValueError, match="repeats"):
        aor.best_lower_bound(scores, included, ks=[2, 2])
    with pytest.raises(ValueError, match="at least one"):
        aor.best_lower_bound(scores, included, ks=[])


# --- canaries and inclusion --------------------------------------------------------------

VOCAB = [f"w{i}" for i in range(500)]


def test_canaries_deterministic_distinct_and_well_formed():
    a = aor.make_canaries(300, VOCAB, length=6, num_labels=2, seed=7)
    assert a == aor.make_canaries(300, VOCAB, length=6, num_labels=2, seed=7)
    assert a != aor.make_canaries(300, VOCAB, length=6, num_labels=2, seed=8)
    assert len(a) == 300 and len({t for t, _ in a}) == 300
    vocab = set(VOCAB)
    for text, label in a:
        words = text.split(" ")
        assert len(words) == 6 and set(words) <= vocab
        assert label in (0, 1)
    assert 0.4 < np.mean([y for _, y in a]) < 0.6
    three = aor.make_canaries(3000, VOCAB, length=4, num_labels=3, seed=0)
    np.testing.assert_allclose(np.bincount([y for _, y in three]) / 3000, 1 / 3, atol=0.03)


def test_canaries_redraw_repeats_in_a_small_vocabulary():
    # 3 words at length 3: 27 sentences, 13 canaries must all differ.
    c = aor.make_canaries(13, ["a", "b", "c"], length=3, num_labels=2, seed=0)
    assert len({t for t, _ in c}) == 13
    with pytest.raises(ValueError, match="too few sentences"):
        aor.make_canaries(14, ["a", "b", "c"], length=3, num_labels=2, seed=0)
    with pytest.raises(ValueError, match="num_labels=1"):
        aor.make_canaries(5, VOCAB, length=3, num_labels=1, seed=0)
    with pytest.raises(ValueError, match="length=0"):
        aor.make_canaries(5, VOCAB, length=0, num_labels=2, seed=0)
    with pytest.raises(ValueError, match="non-blank"):
        aor.make_canaries(5, ["a", " "], length=3, num_labels=2, seed=0)


def test_inclusion_fair_deterministic_and_apart_from_the_canaries():
    bits = aor.draw_inclusion(20_000, seed=5)
    assert bits.dtype == np.bool_ and bits.shape == (20_000,)
    assert abs(bits.mean() - 0.5) < 0.015  # 4 standard errors
    np.testing.assert_array_equal(bits, aor.draw_inclusion(20_000, seed=5))
    assert np.mean(bits == aor.draw_inclusion(20_000, seed=6)) == pytest.approx(0.5, abs=0.015)
    # The same integer seed for the canaries' labels and for the bits gives unrelated draws.
    labels = np.array([y for _, y in aor.make_canaries(20_000, VOCAB, length=3, num_labels=2, seed=5)])
    assert np.mean(labels == bits) == pytest.approx(0.5, abs=0.015)
    with pytest.raises(ValueError, match="num=0"):
        aor.draw_inclusion(0, seed=1)


# --- membership metrics -----------------------------------------------------------------


def test_auc_perfect_reversed_random_and_tied():
    included = aor.draw_inclusion(4000, seed=2)
    perfect = included + np.random.default_rng(0).random(4000)
    assert aor.membership_auc(perfect, included) == 1.0
    assert aor.membership_auc(-perfect, included) == 0.0
    assert aor.membership_auc(np.random.default_rng(1).normal(size=4000), included) == pytest.approx(0.5, abs=0.03)
    assert aor.membership_auc(np.zeros(4000), included) == 0.5
    # Invariant under a strictly increasing map of the scores.
    noisy = included + np.random.default_rng(3).normal(size=4000)
    assert aor.membership_auc(np.exp(noisy), included) == pytest.approx(aor.membership_auc(noisy, included))


def test_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    included = rng.random(60) < 0.4
    s_in, s_out = scores[included][:, None], scores[~included][None, :]
    pairwise = np.mean((s_in > s_out) + 0.5 * (s_in == s_out))
    assert aor.membership_auc(scores, included) == pytest.approx(pairwise, rel=1e-12)


def test_tpr_at_fpr_by_hand_and_by_brute_force():
    scores = np.array([5.0, 4.0, 4.0, 3.0, 2.0, 1.0])
    included = np.array([True, True, False, True, False, False])
    assert aor.tpr_at_fpr(scores, included, fpr=0.0) == pytest.approx(1 / 3)  # t = 5; t = 4 lets the tie's out in
    assert aor.tpr_at_fpr(scores, included, fpr=1 / 3) == 1.0  # t = 3: 3 of 3 in, 1 of 3 out
    assert aor.tpr_at_fpr(scores, included, fpr=1.0) == 1.0
    assert aor.tpr_at_fpr(-scores, included, fpr=0.0) == 0.0  # top score is out: no threshold has FPR 0
    # An FPR exactly at the limit counts (0.29 * 100 rounds to 28.999999999999996): the 29 top
    # scores are out, the next 100 in, 71 more out.
    scores = -np.arange(200.0)
    included = (np.arange(200) >= 29) & (np.arange(200) < 129)
    assert aor.tpr_at_fpr(scores, included, fpr=0.29) == 1.0
    assert aor.tpr_at_fpr(scores, included, fpr=0.28) == 0.0
    rng = np.random.default_rng(5)
    for _ in range(20):
        scores = rng.integers(0, 8, size=40).astype(float)
        included = rng.random(40) < 0.5
        fpr = rng.choice([0.0, 0.05, 0.2, 0.5])
        best = 0.0
        for t in np.unique(scores):
            guess = scores >= t
            if np.mean(guess[~included]) <= fpr:
                best = max(best, np.mean(guess[included]))
        assert aor.tpr_at_fpr(scores, included, fpr=fpr) == pytest.approx(best)


def test_tpr_at_fpr_perfect_reversed_random():
    included = aor.draw_inclusion(4000, seed=6)
    perfect = included + np.random.default_rng(0).random(4000)
    assert aor.tpr_at_fpr(perfect, included, fpr=0.01) == 1.0
    assert aor.tpr_at_fpr(-perfect, included, fpr=0.01) == 0.0
    assert aor.tpr_at_fpr(np.random.default_rng(1).normal(size=4000), included, fpr=0.01) < 0.03


def test_membership_metric_validation():
    with pytest.raises(ValueError, match="need included and excluded canaries, got 0 included of 5"):
        aor.membership_auc(np.zeros(5), np.zeros(5, bool))
    with pytest.raises(ValueError, match="got 5 included of 5"):
        aor.tpr_at_fpr(np.zeros(5), np.ones(5, bool))
    with pytest.raises(ValueError, match=r"fpr=1.5 must be in \[0, 1\]"):
        aor.tpr_at_fpr(np.zeros(5), np.array([True, False, True, False, True]), fpr=1.5)
