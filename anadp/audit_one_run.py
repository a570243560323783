"""One-run privacy auditing: an epsilon lower bound from one training run with many canaries.

`anadp.audit` reruns the privatiser many times around a single canary. That is
cheap for the privatiser alone and out of reach for a whole fine-tuning run.
The one-run audit of Steinke, Nasr and Jagielski ("Privacy auditing with one
(1) training run", NeurIPS 2023) needs a single run instead: it plants `m`
canaries, includes each one in the training set independently with
probability 1/2, trains once, and asks an auditor to guess for each canary
whether it was included. The auditor may abstain; it makes `r` guesses, `v` of
them correct. This module holds the statistics of that audit (no training).

The bound (the paper's main theorem)
------------------------------------
If the training algorithm is (epsilon, delta)-DP with respect to adding or
removing one canary, the guesses can do little better than independent coin
flips that are right with probability

    q(epsilon) = e^epsilon / (1 + e^epsilon),

the accuracy of epsilon-DP randomised response on one bit. With W' ~ Bin(r, q),
the theorem says that for every threshold v

    P[at least v of the r guesses are correct]
        <= P[W' >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= W' < v] / i,

where m counts all canaries, guessed on or not (for delta = 0 only the
binomial tail is left). The right-hand side is a p-value for the null
hypothesis "the algorithm is (epsilon, delta)-DP". The reported bound eps_hat
is the supremum of the epsilon that the observed v rejects at level
beta = 1 - confidence: if the true epsilon were at or above eps_hat, observing
that many correct guesses would have probability at most beta.

Computing it
------------
Bisection over epsilon, with the binomial probabilities exact from
`scipy.stats.binom` (through the count of wrong guesses, Bin(r, 1 - q), so that
1 - q is not rounded away when it is tiny). Bisection needs the p-value to be
nondecreasing in epsilon. It is, whenever c = 2 m delta <= 1: writing
T(v) = P[W' >= v], the i-th term of the maximum plus the tail is

    T(v) + (c / i) (T(v - i) - T(v)) = (1 - c / i) T(v) + (c / i) T(v - i),

a mixture with nonnegative weights of two tails that grow with q, hence with
epsilon; a maximum of nondecreasing functions is nondecreasing. The same
identity shows each term, and so the bound, is monotone in v (terms with
i > v repeat the window of i = v over a larger i, so the maximum can run over
all i >= 1). Larger delta is refused: the monotonicity is then not
guaranteed, and an audit's delta is far below 1 / m anyway.

What the bound assumes
----------------------
- The inclusion bits are independent fair coins, drawn from randomness the
  training run does not otherwise use (`draw_inclusion` has its own seed).
- Which canaries the auditor guesses on, and which way, is a function of the
  trained model (and of anything fixed before the bits were drawn), never of
  the bits themselves.
- "Neighbouring" means one canary in or out with everything else fixed. The
  rest of the training data may be anything, as long as it does not depend on
  the bits.

Unlike the repeated-trial audit, the bound is loose for Gaussian noise at
large epsilon: a run of `m` canaries certifies at most about
log(m / log(1/beta)) even with perfect guesses, and it reaches epsilon only if
the guesses kept are about as accurate as q(epsilon); under Gaussian noise so
accurate a guess is rare. A one-run bound below the accountant's epsilon
therefore proves little; one above it proves the accounting (or the code)
wrong.

Usage (the training run and the scoring of canaries are up to the caller):

    canaries = make_canaries(1000, vocab, length=8, num_labels=2, seed=11)
    included = draw_inclusion(1000, seed=12)
    # ... train on the task data plus canaries[i] for each i with included[i],
    # then score every canary, e.g. the loss drop on its label ...
    eps, k = best_lower_bound(scores, included, ks=(100, 200, 500, 1000), delta=1e-5)
    membership_auc(scores, included), tpr_at_fpr(scores, included, fpr=0.01)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.special
import scipy.stats

from anadp import _checks

# Tags mixed into the seeds of the two generators below, so that one integer
# passed as both seeds still gives unrelated streams.
_CANARY_STREAM = 0x43414E41  # "CANA"
_INCLUSION_STREAM = 0x494E434C  # "INCL"

# Bisection stops when the bracket is this narrow; the lower end is reported, so
# the bound errs on the small side by at most this much.
_EPS_TOL = 1e-9


def _check_confidence(confidence: float) -> float:
    """Validate `confidence` and return the significance level beta = 1 - confidence."""
    return 1.0 - _checks.in_interval("confidence", confidence, "(0, 1)")


def _check_counts(num_guesses: int, num_correct: int, num_canaries: int | None) -> None:
    _checks.integer("num_guesses", num_guesses, 0)
    if not _checks.is_integer(num_correct) or not 0 <= num_correct <= num_guesses:
        raise ValueError(f"num_correct={num_correct} must be an integer in [0, num_guesses={num_guesses}]")
    if num_canaries is not None and (not _checks.is_integer(num_canaries) or num_canaries < num_guesses):
        raise ValueError(f"num_canaries={num_canaries} must be an integer >= num_guesses={num_guesses}")


def guess_accuracy(epsilon: float) -> float:
    """q(epsilon) = e^eps / (1 + e^eps): the best accuracy per guess that epsilon-DP allows."""
    return float(scipy.special.expit(epsilon))


def _check_delta(delta: float, num_canaries: int | None) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta={delta} must be in [0, 1)")
    if delta > 0.0:
        if num_canaries is None:
            raise ValueError(f"delta={delta} > 0 needs num_canaries (the m of the 2 m delta term)")
        if 2.0 * num_canaries * delta > 1.0:
            raise ValueError(
                f"delta={delta} must be in [0, 1 / (2 num_canaries)] = [0, {0.5 / num_canaries:.3g}] "
                f"for num_canaries={num_canaries} (the p-value is only known to be monotone there)"
            )


def one_run_p_value(
    num_guesses: int,
    num_correct: int,
    epsilon: float,
    *,
    delta: float = 0.0,
    num_canaries: int | None = None,
) -> float:
    """The theorem's bound on P[>= num_correct correct of num_guesses] if the run is (epsilon, delta)-DP.

    `P[W' >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= W' < v] / i` with
    W' ~ Bin(r, q(epsilon)), capped at 1; `num_canaries` is m and is needed
    only when delta > 0. Small values reject "(epsilon, delta)-DP";
    `epsilon_lower_bound` inverts this in epsilon.
    """
    _check_counts(num_guesses, num_correct, num_canaries)
    _check_delta(delta, num_canaries)
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon} must be >= 0")
    r, v = int(num_guesses), int(num_correct)
    # Count wrong guesses: at least v right is at most r - v wrong, and a wrong
    # guess has probability 1 - q = expit(-eps), accurate even where q rounds to 1.
    p_wrong = scipy.special.expit(-epsilon)
    tail = float(scipy.stats.binom.cdf(r - v, r, p_wrong))
    if delta == 0.0 or v == 0:
        return tail
    # v - i <= W' <= v - 1 right is r - v + 1 <= wrong <= r - v + i: for i = 1..v
    # these are the running sums of the wrong-count pmf from r - v + 1 up to r.
    window = np.cumsum(scipy.stats.binom.pmf(np.arange(r - v + 1, r + 1), r, p_wrong))
    worst = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * num_canaries * delta * worst)


def epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    num_canaries: int | None = None,
) -> float:
    """Largest epsilon that `num_correct` correct guesses out of `num_guesses` reject at `confidence`.

    With probability at least `confidence` over the inclusion bits (and the
    training run), the returned value is at most the true epsilon of the run:
    it is the supremum of the epsilon whose p-value `one_run_p_value` is at
    most 1 - confidence. It is 0 when the guesses are no better than a coin
    (the p-value at epsilon = 0 is above 1 - confidence), nondecreasing in
    `num_correct`, nonincreasing in `delta`, and at most the delta = 0 bound of
    a perfect guesser with the same number of guesses,
    logit((1 - confidence)^(1 / num_guesses)).

    `num_canaries` (m, the canaries planted, guessed on or not) enters only
    the delta > 0 correction, and is required there; with delta = 0 it is
    optional and only checked to be >= `num_guesses`. `delta` must be at most
    1 / (2 m) (see the module docstring).
    """
    beta = _check_confidence(confidence)
    _check_counts(num_guesses, num_correct, num_canaries)
    _check_delta(delta, num_canaries)

    def rejects(eps: float) -> bool:
        return one_run_p_value(num_guesses, num_correct, eps, delta=delta, num_canaries=num_canaries) <= beta

    if num_correct == 0 or not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):  # terminates: as eps grows the tail tends to 1 (exactly 1 once expit(-eps) underflows)
        lo, hi = hi, 2.0 * hi
    while hi - lo > _EPS_TOL * max(1.0, lo):
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


def perfect_guesser_bound(num_guesses: int, *, confidence: float = 0.95) -> float:
    """Closed form of the delta = 0 bound when all `num_guesses` guesses are right.

    P[Bin(r, q) >= r] = q^r equals beta at q = beta^(1/r), so the bound is
    logit(beta^(1/r)): the most that r guesses can certify at this confidence.
    """
    beta = _check_confidence(confidence)
    _checks.integer("num_guesses", num_guesses, 1)
    log_q = math.log(beta) / num_guesses  # < 0
    return -math.log(math.expm1(-log_q))  # logit(q) = -log(1/q - 1)


# --- from scores to guesses -----------------------------------------------------------


def _check_scores(scores, included) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be 1-D of one length")
    if included.dtype != np.bool_:
        raise ValueError(f"included must be a boolean array, got dtype {included.dtype}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return scores, included


def top_bottom_correct(scores, included, k: int) -> int:
    """Correct guesses when guessing "in" for the k/2 highest scores and "out" for the k/2 lowest.

    The middle `m - k` canaries are abstained on. Ties are broken by canary
    index (a stable sort), an order fixed before the inclusion bits were
    drawn, so the guesses stay a function of the scores alone.
    """
    scores, included = _check_scores(scores, included)
    m = scores.size
    if int(k) != k or k % 2 or not 2 <= k <= m:
        raise ValueError(f"k={k} must be an even integer in [2, {m}] (the number of canaries)")
    half = int(k) // 2
    ranked = included[np.argsort(-scores, kind="stable")]  # highest score first
    return int(np.sum(ranked[:half]) + np.sum(~ranked[m - half :]))


def best_lower_bound(
    scores,
    included,
    *,
    ks,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> tuple[float, int]:
    """The best one-run epsilon bound over guess counts `ks`, and the k that gives it.

    `scores` are per-canary membership scores (higher means "more likely
    trained on"), `included` the true inclusion bits. For each k in `ks` the
    auditor guesses "in" for the top k/2 and "out" for the bottom k/2
    (`top_bottom_correct`) and bounds epsilon from the count.

    Choosing the k with the largest bound after seeing how each k did is a
    multiple comparison: reporting the largest of len(ks) bounds, each valid at
    level beta = 1 - confidence, could overstate epsilon with probability up to
    len(ks) beta. So each k is bounded at confidence 1 - beta / len(ks)
    (Bonferroni): all len(ks) bounds then hold together with probability at
    least 1 - beta, and so does their maximum, whichever k it comes from. `ks`
    must be fixed before the scores are seen; each extra k costs a little
    confidence for all of them. Ties between k go to the first in `ks`.
    """
    scores, included = _check_scores(scores, included)
    beta = _check_confidence(confidence)
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must name at least one guess count")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks={ks} has repeats; each k costs a share of 1 - confidence")
    per_k_confidence = 1.0 - beta / len(ks)
    m = scores.size
    best_eps, best_k = -1.0, ks[0]
    for k in ks:
        correct = top_bottom_correct(scores, included, k)
        eps = epsilon_lower_bound(k, correct, delta=delta, confidence=per_k_confidence, num_canaries=m)
        if eps > best_eps:
            best_eps, best_k = eps, k
    return best_eps, best_k


# --- canaries and their inclusion bits -------------------------------------------------


def make_canaries(
    num: int,
    vocab_words: Sequence[str],
    *,
    length: int,
    num_labels: int,
    seed: int,
) -> list[tuple[str, int]]:
    """`num` canary examples: sentences of `length` random words, each with a random label.

    Words are drawn uniformly with replacement from `vocab_words` and labels
    uniformly from range(num_labels), all from a NumPy Generator of its own
    (seeded by `seed`, apart from any training randomness). The label carries
    no information about the text, so a model can fit a canary only by
    memorising it, and how well it fits an included canary against an
    excluded one measures memorisation alone. Texts are distinct (repeats are
    redrawn), so no two canaries share a text with different labels.
    Deterministic in `seed`.
    """
    _checks.integer("num", num, 1)
    _checks.integer("length", length, 1)
    _checks.integer("num_labels", num_labels, 2)
    words = list(vocab_words)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError("vocab_words must be a non-empty sequence of non-blank strings")
    if len(set(words)) ** length < 2 * num:
        raise ValueError(
            f"vocab of {len(set(words))} distinct words at length={length} has too few sentences "
            f"for num={num} distinct canaries (need at least 2 num)"
        )
    rng = np.random.default_rng([int(seed), _CANARY_STREAM])
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < num:
        text = " ".join(words[i] for i in rng.integers(len(words), size=length))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    labels = rng.integers(num_labels, size=num)
    return [(t, int(y)) for t, y in zip(texts, labels)]


def draw_inclusion(num: int, seed: int) -> np.ndarray:
    """`num` inclusion bits, each True with probability 1/2 independently of the others.

    The bound needs these to be fair coins that the training run cannot see
    except through the canaries it is given, so they come from a Generator of
    their own: `seed` should be chosen apart from the training seed (and one
    integer used for both `make_canaries` and here still gives unrelated draws).
    """
    _checks.integer("num", num, 1)
    rng = np.random.default_rng([int(seed), _INCLUSION_STREAM])
    return rng.random(num) < 0.5


# --- membership metrics of the same scores ---------------------------------------------


def _two_classes(scores, included) -> tuple[np.ndarray, np.ndarray]:
    scores, included = _check_scores(scores, included)
    n_in = int(included.sum())
    if n_in == 0 or n_in == included.size:
        raise ValueError(f"need included and excluded canaries, got {n_in} included of {included.size}")
    return scores, included


def membership_auc(scores, included) -> float:
    """Area under the ROC curve of `scores` as a test of "included": P[s_in > s_out] + P[s_in = s_out] / 2.

    The Mann-Whitney statistic from average ranks (ties count one half), in
    O(m log m) with NumPy alone. 1 for scores that rank every included canary
    above every excluded one, 0 for the reverse, about 1/2 for scores that
    carry no membership signal. An average over all canaries, it complements
    the epsilon bound, which rests on the most confident guesses.
    """
    scores, included = _two_classes(scores, included)
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie group
    n_in = int(included.sum())
    n_out = scores.size - n_in
    return float((ranks[included].sum() - n_in * (n_in + 1) / 2.0) / (n_in * n_out))


def tpr_at_fpr(scores, included, fpr: float = 0.01) -> float:
    """Largest true-positive rate of a threshold test "included iff score >= t" whose false-positive rate is <= fpr.

    Rates are empirical over the given canaries and thresholds run over the
    observed scores (a tie group is in or out as a whole); no interpolation
    between thresholds, so this is what some actual threshold achieves. 0 when
    no threshold stays within `fpr`.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr={fpr} must be in [0, 1]")
    scores, included = _two_classes(scores, included)
    order = np.argsort(-scores, kind="stable")
    ranked, ranked_in = scores[order], included[order]
    true_pos = np.cumsum(ranked_in)
    false_pos = np.cumsum(~ranked_in)
    # A threshold at a score admits its whole tie group: keep the last position of each group.
    group_end = np.append(ranked[1:] != ranked[:-1], True)
    n_in = int(included.sum())
    n_out = scores.size - n_in
    allowed = group_end & (false_pos / n_out <= fpr)  # a division, so fpr = 29 / 100 admits 29 of 100
    return float(true_pos[allowed].max() / n_in) if allowed.any() else 0.0
