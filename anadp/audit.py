"""Empirical privacy auditing of the privatiser: a measured lower bound on epsilon.

An accountant states what a mechanism promises; an audit measures what it
leaks. This module runs the mechanism of `anadp.privatize` (the code path used
in training) many times with and without an auditor-chosen canary, lets an
auditor guess from the releases alone whether the canary was there, and turns
the guesses into an epsilon that holds as a lower bound with a stated
confidence. A bound above the epsilon an accountant reports is proof (up to
the stated confidence) that the report is wrong; a bound below it is
consistent with the report but proves nothing about its tightness beyond
what the bound shows.

Threat model ("gradient canary", white-box; Nasr et al., "Tight auditing of
differentially private machine learning", USENIX Security 2023)
---------------------------------------------------------------------------
- The auditor chooses the canary's per-example gradient directly (no model,
  no data): by default a gradient of norm `canary_norm * C` spread evenly over
  one group's coordinates, in the group the allocation noises least. For
  elliptical clipping this whitens to norm `C / s_min` and is clipped back to
  `C`; for global clipping it passes unclipped and meets noise `sigma C s_min`.
- The other rows of the batch (`num_background`) have fixed gradients known to
  the auditor (zero or random; random ones exercise per-example clipping).
  They are always present, so the run is `T` steps on a physical batch of
  `num_background + 1` rows in which only the canary's row is switched on or
  off through the padding mask. The DP guarantee of a subsampled Gaussian
  step holds for any fixed choice of the other examples, so this is a valid
  instance of the add-or-remove-one neighbouring relation.
- The allocation `s` is fixed for the whole run (ANADP computes it from past
  releases; a fixed allocation is one such outcome and the one the auditor
  likes best).
- The auditor observes every release of the run (all `T` noisy mean
  gradients), never the mask, the sample, or the noise.
- Hypotheses: H0 "canary absent" (its row is masked out at every step) and H1
  "canary present" (at every step its row is included independently with
  probability `sampling_rate = q`, as Poisson sampling includes it; `q = 1`
  is full-batch training, the strongest audit).

Test statistic
--------------
The auditor computes, through `privatize` itself with `noise_multiplier=0`,
the noiseless release of the background batch `b` and the shift `m` that the
clipped canary adds to it, and the per-coordinate noise variance `v` of the
release (group k: `(sigma C s_k / qN)^2`, from the mechanism's contract). Each
release `r_t` gives a whitened projection

    x_t = <r_t - b, m / v> / mu,     mu = sqrt(<m, m / v>)

which is N(0, 1) when the canary is out and N(mu, 1) when it is in at step t.
The run's score is the log-likelihood ratio of the Poisson-sampled
alternative against the null,

    score = sum_t log(1 - q + q exp(mu x_t - mu^2 / 2)),

the Neyman-Pearson statistic for this pair of hypotheses when the mechanism
meets its contract (for q = 1 it is an affine function of sum_t x_t). The
statistic is only a choice: the bound below is valid whatever the auditor
computes, since its threshold is chosen on data not used for the bound.

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

This is the repeated-trial hypothesis test, chosen over one-run auditing
(Steinke, Nasr and Jagielski, NeurIPS 2023). One-run auditing exists to avoid
training many models; its bound stays well below the true epsilon of a
Gaussian mechanism beyond small epsilon, however many canaries it uses. Here a
run of the mechanism costs milliseconds (trials are vectorised with `jax.vmap`
over noise keys), so repeated trials are affordable, and their bound approaches
the true epsilon as the number of trials grows, capped only by the ceiling above.

Usage (see `experiments/audit.py` for the three mechanisms of issue #8):

    run = CanaryRun("global", group_sizes=(1000, 10), group_scales=(1.0049, 0.1005),
                    noise_multiplier=4.0, sampling_rate=1.0, steps=10)
    out = run_audit(run, num_trials=100_000, seed=1, delta=1e-5)
    out.result.epsilon_lower_bound   # about 9: far above DP-SGD's 3.34 at sigma = 4
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from anadp.clipping import check_clipping
from anadp.noise import privatize

BACKGROUNDS = ("zero", "random")


# --- statistics ---------------------------------------------------------------


def clopper_pearson_upper(successes: Any, trials: Any, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a binomial proportion.

    Returns `p_hi` with `P[p <= p_hi] >= 1 - alpha` for `successes ~ Bin(trials, p)`:
    the `1 - alpha` quantile of Beta(k + 1, n - k), and 1 when k = n.
    Vectorised over `successes` (and `trials`).
    """
    _check_alpha(alpha)
    k, n = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(trials, np.float64))
    _check_counts(k, n)
    full = k >= n
    b = np.where(full, 1.0, n - k)
    upper = scipy.special.betaincinv(k + 1.0, b, 1.0 - alpha)
    return np.where(full, 1.0, upper)


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: the `alpha` quantile of Beta(k, n - k + 1), 0 when k = 0."""
    _check_alpha(alpha)
    k, n = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(trials, np.float64))
    _check_counts(k, n)
    empty = k <= 0
    a = np.where(empty, 1.0, k)
    lower = scipy.special.betaincinv(a, n - k + 1.0, alpha)
    return np.where(empty, 0.0, lower)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")


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
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    return (1.0 - confidence) / 2.0


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


# --- the canary run -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CanaryRun:
    """A run of the privatiser that the auditor attacks (see the module docstring).

    Attributes:
      clipping: "global" (DP-SGD, or the literal ANADP variant) or "elliptical".
      group_sizes: coordinates `d_k` of each parameter group; each group is one
        leaf of the gradient tree.
      group_scales: the allocation `s_k`, one per group; None is uniform (DP-SGD).
      noise_multiplier: sigma. l2_norm_clip: C.
      sampling_rate: q, the probability that a present canary is in a step's batch.
      steps: T, releases per run.
      canary_group: the group holding the canary's gradient; None picks the
        least-noised group (the first, if several tie).
      canary_norm: the canary gradient's norm in units of C.
      num_background: other rows in the batch, always present.
      background: "zero" or "random" gradients for those rows (random norms in
        [0.5 C, 2 C], so some are clipped).
      background_seed: NumPy seed of the random background.
    """

    clipping: str
    group_sizes: tuple[int, ...]
    group_scales: tuple[float, ...] | None
    noise_multiplier: float
    sampling_rate: float
    steps: int
    l2_norm_clip: float = 1.0
    canary_group: int | None = None
    canary_norm: float = 1.0
    num_background: int = 7
    background: str = "random"
    background_seed: int = 0

    def __post_init__(self):
        check_clipping(self.clipping)
        if not self.group_sizes or any(int(d) < 1 for d in self.group_sizes):
            raise ValueError(f"group_sizes={self.group_sizes} must be positive")
        if self.group_scales is not None:
            if len(self.group_scales) != len(self.group_sizes):
                raise ValueError(f"group_scales={self.group_scales} needs one scale per group {self.group_sizes}")
            if any(not s > 0 for s in self.group_scales):
                raise ValueError(f"group_scales={self.group_scales} must be > 0")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be >= 0")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate={self.sampling_rate} must be in (0, 1]")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not self.l2_norm_clip > 0 or not self.canary_norm > 0:
            raise ValueError("l2_norm_clip and canary_norm must be > 0")
        if self.canary_group is not None and not 0 <= self.canary_group < len(self.group_sizes):
            raise ValueError(f"canary_group={self.canary_group} is not a group index")
        if self.num_background < 0:
            raise ValueError(f"num_background={self.num_background} must be >= 0")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r} is not one of {BACKGROUNDS}")

    @property
    def scales(self) -> np.ndarray:
        if self.group_scales is None:
            return np.ones(len(self.group_sizes), np.float32)
        return np.asarray(self.group_scales, np.float32)

    @property
    def target_group(self) -> int:
        if self.canary_group is not None:
            return self.canary_group
        return int(np.argmin(self.scales))

    @property
    def num_rows(self) -> int:
        return self.num_background + 1

    @property
    def expected_batch_size(self) -> float:
        """qN with N = the batch's rows (only a divisor of the release here)."""
        return self.sampling_rate * self.num_rows

    def _names(self) -> list[str]:
        width = len(str(len(self.group_sizes)))
        return [f"group_{k:0{width}d}" for k in range(len(self.group_sizes))]

    def batch(self) -> dict:
        """Per-example gradients [rows, d_k] per group: row 0 the canary, then the background."""
        rng = np.random.default_rng(self.background_seed)
        sizes = [int(d) for d in self.group_sizes]
        total = sum(sizes)
        canary = np.zeros(total, np.float32)
        start = sum(sizes[: self.target_group])
        size = sizes[self.target_group]
        canary[start : start + size] = self.canary_norm * self.l2_norm_clip / math.sqrt(size)
        if self.background == "random":
            rows = rng.standard_normal((self.num_background, total))
            norms = rng.uniform(0.5, 2.0, self.num_background) * self.l2_norm_clip
            rows *= (norms / np.linalg.norm(rows, axis=1))[:, None]
        else:
            rows = np.zeros((self.num_background, total))
        flat = np.concatenate([canary[None], rows.astype(np.float32)])
        splits = np.split(flat, np.cumsum(sizes)[:-1], axis=1)
        return {name: jnp.asarray(part) for name, part in zip(self._names(), splits)}

    def scale_tree(self) -> dict:
        """One scalar per group leaf; ones for DP-SGD (as `Mechanism` passes them)."""
        return {name: jnp.float32(s) for name, s in zip(self._names(), self.scales)}

    def mechanism_args(self) -> dict:
        """The run's numbers, passed to the jitted functions as traced arguments
        (so that runs of the same shape share one compilation)."""
        return dict(
            scales=self.scale_tree(),
            noise_multiplier=jnp.float32(self.noise_multiplier),
            l2_norm_clip=jnp.float32(self.l2_norm_clip),
            expected_batch_size=jnp.float32(self.expected_batch_size),
        )


def _release(grads, key, mask, *, scales, noise_multiplier, l2_norm_clip, expected_batch_size, clipping):
    """One release of the mechanism under audit: `anadp.privatize`, unchanged."""
    return privatize(
        grads,
        scales,
        key,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        clipping=clipping,
        mask=mask,
    )


@functools.partial(jax.jit, static_argnames=("clipping",))
def _noiseless_releases(grads, mechanism, *, clipping):
    """(release of the background rows, shift added by the canary row), at zero noise."""
    mechanism = dict(mechanism, noise_multiplier=jnp.zeros([], jnp.float32))
    num_rows = jax.tree_util.tree_leaves(grads)[0].shape[0]
    key = jax.random.PRNGKey(0)  # unused at zero noise
    without = jnp.ones([num_rows], jnp.float32).at[0].set(0.0)
    baseline = _release(grads, key, without, clipping=clipping, **mechanism)
    full = _release(grads, key, jnp.ones([num_rows], jnp.float32), clipping=clipping, **mechanism)
    return baseline, jax.tree_util.tree_map(jnp.subtract, full, baseline)


class Auditor(NamedTuple):
    """What the auditor precomputes from the mechanism's public description.

    Attributes:
      baseline: noiseless release of the background rows (tree).
      weights: `m / v`, the canary's noiseless shift over the noise variance, / mu (tree).
      signal: mu, the canary's shift of one release in units of noise standard
        deviations (per step; 1/sigma for DP-SGD and elliptical clipping,
        1/(sigma s_min) for global clipping with the canary in group argmin s).
    """

    baseline: Any
    weights: Any
    signal: float


def make_auditor(run: CanaryRun) -> Auditor:
    """Whitening and matched filter for the canary, computed with the real privatiser at zero noise."""
    baseline, shift = _noiseless_releases(run.batch(), run.mechanism_args(), clipping=run.clipping)
    # Noise std of the release in group k: sigma C s_k / qN (METHOD.md, both
    # clipping modes). A noiseless mechanism gets a tiny floor so that the
    # statistic stays finite and separates perfectly.
    floor = 1e-6 * run.l2_norm_clip / run.expected_batch_size
    names = run._names()
    std = {
        name: max(run.noise_multiplier * run.l2_norm_clip * float(s) / run.expected_batch_size, floor)
        for name, s in zip(names, run.scales)
    }
    energy = sum(float(jnp.sum(jnp.square(shift[n]))) / std[n] ** 2 for n in names)
    if not energy > 0:
        raise ValueError("the canary's clipped gradient is zero: nothing to detect")
    signal = math.sqrt(energy)
    weights = {n: shift[n] / (std[n] ** 2 * signal) for n in names}
    return Auditor(baseline, weights, signal)


def _run_trials(run, auditor, key, num_trials, canary_present, chunk_size):
    """The auditor's scores of `num_trials` independent runs of T releases.

    Each trial draws its own noise (and, when present, the canary's Poisson
    inclusion at every step) from `key`; the score is computed from the releases
    only. Trials are vectorised with `jax.vmap`, `chunk_size` at a time, with a
    `lax.map` over steps.
    """
    chunk_size = max(1, min(chunk_size, num_trials))
    num_chunks = -(-num_trials // chunk_size)
    keys = jax.random.split(key, num_chunks * chunk_size).reshape(num_chunks, chunk_size, -1)
    args = dict(
        present=jnp.float32(1.0 if canary_present else 0.0),
        grads=run.batch(),
        mechanism=run.mechanism_args(),
        sampling_rate=jnp.float32(run.sampling_rate),
        auditor=auditor._replace(signal=jnp.float32(auditor.signal)),
    )
    scores = [
        np.asarray(_trial_scores(keys[c], **args, clipping=run.clipping, steps=run.steps)) for c in range(num_chunks)
    ]
    return np.concatenate(scores)[:num_trials].astype(np.float64)


@functools.partial(jax.jit, static_argnames=("clipping", "steps"))
def _trial_scores(trial_keys, present, grads, mechanism, sampling_rate, auditor, *, clipping, steps):
    """Scores [n] of n independent runs of `steps` releases (one key each).

    `present` (0 or 1) switches the canary's Poisson inclusion on; it is traced
    so that both hypotheses share one compilation.
    """
    q = sampling_rate
    log_absent = jnp.log1p(-q)  # -inf for q = 1, and logaddexp(-inf, a) = a
    log_q = jnp.log(q)
    mu = auditor.signal
    num_rows = jax.tree_util.tree_leaves(grads)[0].shape[0]
    background_mask = jnp.ones([num_rows], jnp.float32).at[0].set(0.0)

    def step(step_key):
        include_key, noise_key = jax.random.split(step_key)
        include = present * jax.random.bernoulli(include_key, q).astype(jnp.float32)
        mask = background_mask.at[0].set(include)
        released = _release(grads, noise_key, mask, clipping=clipping, **mechanism)
        # Everything below sees only the release and public precomputations.
        x = sum(
            jnp.vdot(r - b, w)
            for r, b, w in zip(
                jax.tree_util.tree_leaves(released),
                jax.tree_util.tree_leaves(auditor.baseline),
                jax.tree_util.tree_leaves(auditor.weights),
            )
        )
        return jnp.logaddexp(log_absent, log_q + mu * x - 0.5 * mu * mu)

    def trial(trial_key):
        return jnp.sum(jax.lax.map(step, jax.random.split(trial_key, steps)))

    return jax.vmap(trial)(trial_keys)


class CanaryAudit(NamedTuple):
    """`run_audit`'s output: the bound and what it was computed from."""

    result: AuditResult
    signal_per_step: float
    scores_out: np.ndarray
    scores_in: np.ndarray


def run_audit(
    run: CanaryRun,
    *,
    num_trials: int,
    seed: int,
    delta: float,
    confidence: float = 0.95,
    chunk_size: int = 256,
) -> CanaryAudit:
    """Audits `run`: `num_trials` trials with the canary absent and as many present.

    Half of each are used to choose the threshold, half to bound epsilon (so
    the counts in the result are on `num_trials // 2`-ish trials per side).
    """
    if num_trials < 2:
        raise ValueError(f"num_trials={num_trials} must be >= 2")
    auditor = make_auditor(run)
    key_out, key_in = jax.random.split(jax.random.PRNGKey(seed))
    scores_out = _run_trials(run, auditor, key_out, num_trials, False, chunk_size)
    scores_in = _run_trials(run, auditor, key_in, num_trials, True, chunk_size)
    result = audit_scores(scores_out, scores_in, delta=delta, confidence=confidence)
    return CanaryAudit(result, auditor.signal, scores_out, scores_in)


def gaussian_dp_mu_estimate(scores_out: Sequence[float], scores_in: Sequence[float]) -> float:
    """Point estimate of mu for full-batch runs (q = 1), where both scores are Gaussian
    with equal variance: (mean_in - mean_out) / std_out. Not a bound."""
    scores_out = np.asarray(scores_out, np.float64)
    scores_in = np.asarray(scores_in, np.float64)
    return float((scores_in.mean() - scores_out.mean()) / scores_out.std(ddof=1))
