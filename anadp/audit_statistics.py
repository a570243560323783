"""Audit statistics: from an auditor's guesses to a lower bound on epsilon.

Pure NumPy / SciPy on scores or counts; the runs that produce the scores are
`anadp.audit`'s (the canary run) and `anadp.audit_one_run`'s.

From guesses to epsilon (repeated trials, Clopper-Pearson)
----------------------------------------------------------
A mechanism that is (epsilon, delta)-DP forces every test of H0 against H1 to
satisfy (Kairouz, Oh and Viswanath 2015)

    FPR + e^epsilon FNR >= 1 - delta   and   FNR + e^epsilon FPR >= 1 - delta,

so epsilon >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)).
With `n` independent trials under each hypothesis, the trials of each
hypothesis are split in two halves. On the first half the auditor picks the
threshold ("guess present when score > threshold") that maximises the bound
computed on that half; on the second half it counts false positives and false
negatives, bounds FPR and FNR from above with one-sided Clopper-Pearson
intervals at level `(1 - confidence) / 2` each, and plugs the upper bounds into
the inequality. By a union bound both upper bounds hold together with
probability at least `confidence`, and then the reported epsilon is at most
the true one. The finite number of trials also caps what can be certified: with
no error at all on `n_eval` trials per side the bound is about
`log(n_eval / log(2 / (1 - confidence)))` (the "ceiling" reported with every
result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from anadp import _checks


def clopper_pearson_upper(successes: Any, trials: Any, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a binomial proportion.

    Returns `p_hi` with `P[p <= p_hi] >= 1 - alpha` for `successes ~ Bin(trials, p)`:
    the `1 - alpha` quantile of Beta(k + 1, n - k), and 1 when k = n.
    Vectorised over `successes` (and `trials`).
    """
    _checks.in_interval("alpha", alpha, "(0, 1)")
    k, n = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(trials, np.float64))
    _check_counts(k, n)
    full = k >= n
    b = np.where(full, 1.0, n - k)
    upper = scipy.special.betaincinv(k + 1.0, b, 1.0 - alpha)
    return np.where(full, 1.0, upper)


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: the `alpha` quantile of Beta(k, n - k + 1), 0 when k = 0."""
    _checks.in_interval("alpha", alpha, "(0, 1)")
    k, n = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(trials, np.float64))
    _check_counts(k, n)
    empty = k <= 0
    a = np.where(empty, 1.0, k)
    lower = scipy.special.betaincinv(a, n - k + 1.0, alpha)
    return np.where(empty, 0.0, lower)


def _check_counts(k: np.ndarray, n: np.ndarray) -> None:
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {k} of {n}")


def epsilon_from_error_rates(fpr: Any, fnr: Any, delta: float) -> np.ndarray:
    """The smallest epsilon that an (epsilon, delta)-DP mechanism allows for a test with these rates.

    `max(log((1 - delta - fnr) / fpr), log((1 - delta - fpr) / fnr), 0)`, with
    `log(x / 0) = inf` for x > 0. Plug in upper bounds on the rates to get a
    lower bound on epsilon.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta={delta} must be in [0, 1)")
    fpr, fnr = np.broadcast_arrays(np.asarray(fpr, np.float64), np.asarray(fnr, np.float64))

    def one_side(num, den):
        num = np.maximum(num, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
            return np.log(np.maximum(ratio, 1.0))  # ratio < 1 says nothing: epsilon >= 0

    return np.maximum(one_side(1.0 - delta - fnr, fpr), one_side(1.0 - delta - fpr, fnr))


def epsilon_lower_bound(
    false_positives: Any,
    num_negatives: Any,
    false_negatives: Any,
    num_positives: Any,
    *,
    delta: float,
    confidence: float = 0.95,
) -> np.ndarray:
    """Epsilon lower bound from counts, holding with probability >= `confidence`.

    FPR and FNR are bounded from above by one-sided Clopper-Pearson intervals at
    level `(1 - confidence) / 2` each (a union bound over the two), then
    `epsilon_from_error_rates` is applied. Vectorised over the counts.
    """
    alpha = _split_alpha(confidence)
    fpr_hi = clopper_pearson_upper(false_positives, num_negatives, alpha)
    fnr_hi = clopper_pearson_upper(false_negatives, num_positives, alpha)
    return epsilon_from_error_rates(fpr_hi, fnr_hi, delta)


def _split_alpha(confidence: float) -> float:
    return (1.0 - _checks.in_interval("confidence", confidence, "(0, 1)")) / 2.0


def error_counts(scores_out: np.ndarray, scores_in: np.ndarray, thresholds: Any) -> tuple:
    """(false positives, false negatives) of "present iff score > threshold" for each threshold."""
    out_sorted = np.sort(np.asarray(scores_out, np.float64))
    in_sorted = np.sort(np.asarray(scores_in, np.float64))
    thresholds = np.asarray(thresholds, np.float64)
    false_positives = out_sorted.size - np.searchsorted(out_sorted, thresholds, side="right")
    false_negatives = np.searchsorted(in_sorted, thresholds, side="right")
    return false_positives, false_negatives


class AuditResult(NamedTuple):
    """The outcome of one audit. Counts are on the evaluation half of the trials.

    Attributes:
      epsilon_lower_bound: holds with probability >= `confidence`.
      epsilon_estimate: the same formula with the observed rates (a point
        estimate, not a bound; inf when an error count is 0).
      epsilon_ceiling: the largest bound these evaluation sizes can certify
        (zero errors on both sides).
      threshold: the decision threshold, chosen on the selection half.
      false_positives, num_negatives: canary-absent trials guessed present, of how many.
      false_negatives, num_positives: canary-present trials guessed absent, of how many.
      fpr_upper, fnr_upper: the Clopper-Pearson upper bounds used.
      confidence, delta: as requested.
    """

    epsilon_lower_bound: float
    epsilon_estimate: float
    epsilon_ceiling: float
    threshold: float
    false_positives: int
    num_negatives: int
    false_negatives: int
    num_positives: int
    fpr_upper: float
    fnr_upper: float
    confidence: float
    delta: float


def audit_scores(
    scores_out: Any,
    scores_in: Any,
    *,
    delta: float,
    confidence: float = 0.95,
    selection_fraction: float = 0.5,
) -> AuditResult:
    """Turns the auditor's scores into an epsilon lower bound (split-threshold method).

    Args:
      scores_out: [n0] scores of independent trials with the canary absent.
      scores_in: [n1] scores of independent trials with the canary present.
        Larger scores mean "present". Trials must be i.i.d. within each array.
      delta: the delta at which epsilon is bounded.
      confidence: probability with which the bound holds.
      selection_fraction: the leading fraction of each array used to choose the
        threshold; the rest is used for the bound.

    Returns:
      An AuditResult whose counts refer to the evaluation part.
    """
    scores_out = np.asarray(scores_out, np.float64).ravel()
    scores_in = np.asarray(scores_in, np.float64).ravel()
    if not 0.0 < selection_fraction < 1.0:
        raise ValueError(f"selection_fraction={selection_fraction} must be in (0, 1)")
    n_out_sel = int(scores_out.size * selection_fraction)
    n_in_sel = int(scores_in.size * selection_fraction)
    if min(n_out_sel, n_in_sel, scores_out.size - n_out_sel, scores_in.size - n_in_sel) < 1:
        raise ValueError(f"too few trials ({scores_out.size} absent, {scores_in.size} present) to split")
    if not (np.all(np.isfinite(scores_out)) and np.all(np.isfinite(scores_in))):
        raise ValueError("scores must be finite")
    sel_out, eval_out = scores_out[:n_out_sel], scores_out[n_out_sel:]
    sel_in, eval_in = scores_in[:n_in_sel], scores_in[n_in_sel:]

    # Candidates: every observed selection score, plus "everything present".
    candidates = np.concatenate([[-np.inf], np.unique(np.concatenate([sel_out, sel_in]))])
    fp, fn = error_counts(sel_out, sel_in, candidates)
    bounds = epsilon_lower_bound(fp, sel_out.size, fn, sel_in.size, delta=delta, confidence=confidence)
    # Among thresholds tied at the best bound, take the middle of the tied range
    # (for separated scores: halfway between the classes, not at the edge of one).
    first = int(np.argmax(bounds))
    last = first
    while last + 1 < candidates.size and bounds[last + 1] >= bounds[first]:
        last += 1
    upper = candidates[last + 1] if last + 1 < candidates.size else candidates[last]
    threshold = float(0.5 * (candidates[first] + upper)) if np.isfinite(candidates[first]) else float(candidates[first])

    fp, fn = error_counts(eval_out, eval_in, threshold)
    fp, fn = int(fp), int(fn)
    alpha = _split_alpha(confidence)
    fpr_hi = float(clopper_pearson_upper(fp, eval_out.size, alpha))
    fnr_hi = float(clopper_pearson_upper(fn, eval_in.size, alpha))
    return AuditResult(
        epsilon_lower_bound=float(epsilon_from_error_rates(fpr_hi, fnr_hi, delta)),
        epsilon_estimate=float(epsilon_from_error_rates(fp / eval_out.size, fn / eval_in.size, delta)),
        epsilon_ceiling=float(
            epsilon_lower_bound(0, eval_out.size, 0, eval_in.size, delta=delta, confidence=confidence)
        ),
        threshold=threshold,
        false_positives=fp,
        num_negatives=int(eval_out.size),
        false_negatives=fn,
        num_positives=int(eval_in.size),
        fpr_upper=fpr_hi,
        fnr_upper=fnr_hi,
        confidence=confidence,
        delta=delta,
    )


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-Gaussian-DP mechanism at `delta` (Balle and Wang 2018; Dong et al. 2022).

    Solves `Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta`. This is
    exact for T full-batch Gaussian steps (q = 1) with mu = sqrt(T) / sigma, and
    serves as an independent check of the accountant in that case.
    """
    if mu < 0 or not 0.0 < delta < 1.0:
        raise ValueError(f"need mu >= 0 and delta in (0, 1), got mu={mu}, delta={delta}")
    if mu == 0:
        return 0.0
    norm = scipy.stats.norm

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2.0
    return float(scipy.optimize.brentq(excess, 0.0, hi, xtol=1e-12))


def attainable_gaussian_bound(mu: float, num_eval: int, *, delta: float, confidence: float = 0.95) -> float:
    """The bound an audit with `num_eval` evaluation trials per hypothesis would report
    against an exactly mu-Gaussian-DP mechanism with N(0, 1) / N(mu, 1) scores, with
    error counts at their expected values and the best threshold. For reading a
    full-batch audit: how close these trial counts can get to the true epsilon."""
    thresholds = np.linspace(-10.0, mu + 10.0, 20_001)
    fp = np.round(num_eval * scipy.stats.norm.sf(thresholds))
    fn = np.round(num_eval * scipy.stats.norm.cdf(thresholds - mu))
    bounds = epsilon_lower_bound(fp, num_eval, fn, num_eval, delta=delta, confidence=confidence)
    return float(bounds.max())


def gaussian_dp_mu_estimate(scores_out: Sequence[float], scores_in: Sequence[float]) -> float:
    """Point estimate of mu for full-batch runs (q = 1), where both scores are Gaussian
    with equal variance: (mean_in - mean_out) / std_out. Not a bound."""
    scores_out = np.asarray(scores_out, np.float64)
    scores_in = np.asarray(scores_in, np.float64)
    return float((scores_in.mean() - scores_out.mean()) / scores_out.std(ddof=1))
