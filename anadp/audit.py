"""Empirical privacy auditing of the privatiser: a measured lower bound on epsilon.

An accountant states what a mechanism promises; an audit measures what it
leaks. This module runs `anadp.privatize` many times with and without an
auditor-chosen canary, lets an auditor guess from the releases alone whether
the canary was there, and turns the guesses into an epsilon that holds as a
lower bound with a stated confidence (`anadp.audit_statistics`). `privatize`
is not training's code path (training clips with its engine, vmap or ghost,
and releases with `Mechanism.release`), but it ends in the same privatiser,
`noise.add_noise`, on a clipped sum from `clipping.clipped_sum`, which the
tests check against the memory and ghost paths. A bound above the epsilon an accountant reports is proof (up to
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
computes, since its threshold is chosen on data not used for the bound
(`audit_statistics.audit_scores`: split-threshold, Clopper-Pearson).

This is the repeated-trial hypothesis test, chosen over one-run auditing
(Steinke, Nasr and Jagielski, NeurIPS 2023). One-run auditing exists to avoid
training many models; its bound stays well below the true epsilon of a
Gaussian mechanism beyond small epsilon, however many canaries it uses. Here a
run of the mechanism costs milliseconds (trials are vectorised with `jax.vmap`
over noise keys), so repeated trials are affordable, and their bound approaches
the true epsilon as the number of trials grows, capped only by the ceiling that the number of trials sets.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anadp import _checks
from anadp.audit_statistics import AuditResult, audit_scores
from anadp.clipping import check_clipping
from anadp.noise import Mechanism, privatize

BACKGROUNDS = ("zero", "random")


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
        _checks.noise_multiplier(self.noise_multiplier)
        _checks.sampling_rate(self.sampling_rate)
        _checks.integer("steps", self.steps, 1)
        _checks.at_least("l2_norm_clip", self.l2_norm_clip, 0, strict=True)
        _checks.at_least("canary_norm", self.canary_norm, 0, strict=True)
        if self.canary_group is not None and not 0 <= self.canary_group < len(self.group_sizes):
            raise ValueError(f"canary_group={self.canary_group} is not a group index")
        _checks.integer("num_background", self.num_background, 0)
        _checks.one_of("background", self.background, BACKGROUNDS)

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

    def mechanism(self) -> Mechanism:
        """The mechanism this run releases through, for its accounting (DP-SGD
        without an allocation, ANADP with one); the releases themselves go
        through `privatize` with `mechanism_args()`."""
        return Mechanism(self.l2_norm_clip, self.noise_multiplier, self.expected_batch_size,
                         adaptive=self.group_scales is not None, clipping=self.clipping)

    def mechanism_args(self) -> dict:
        """The `privatize` arguments of the run, passed to the jitted functions as
        traced arguments (so that runs of the same shape share one compilation)."""
        return dict(
            scales=self.scale_tree(),
            noise_multiplier=jnp.float32(self.noise_multiplier),
            l2_norm_clip=jnp.float32(self.l2_norm_clip),
            expected_batch_size=jnp.float32(self.expected_batch_size),
        )


@functools.partial(jax.jit, static_argnames=("clipping",))
def _noiseless_releases(grads, mechanism, *, clipping):
    """(release of the background rows, shift added by the canary row), at zero noise."""
    mechanism = dict(mechanism, noise_multiplier=jnp.zeros([], jnp.float32))
    num_rows = jax.tree_util.tree_leaves(grads)[0].shape[0]
    key = jax.random.PRNGKey(0)  # unused at zero noise
    without = jnp.ones([num_rows], jnp.float32).at[0].set(0.0)
    baseline = privatize(grads, key=key, mask=without, clipping=clipping, **mechanism)
    full = privatize(grads, key=key, mask=jnp.ones([num_rows], jnp.float32), clipping=clipping, **mechanism)
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
        released = privatize(grads, key=noise_key, mask=mask, clipping=clipping, **mechanism)
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


def run_audit(run: CanaryRun, *, num_trials: int, seed: int, delta: float, confidence: float = 0.95,
              chunk_size: int = 256) -> CanaryAudit:
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


