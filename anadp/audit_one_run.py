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
removing one canary, the guesses can do no better than independent coin
flips that are right with probability

    q(epsilon) = e^epsilon / (1 + e^epsilon),

the accuracy of epsilon-DP randomised response on one bit. For delta = 0 the
theorem says, for every threshold v,

    P[at least v of the r guesses are correct] <= P[Bin(r, q(epsilon)) >= v].

The right-hand side is a p-value for the null hypothesis "the algorithm is
(epsilon, 0)-DP". It increases with epsilon, so the set of epsilon that the
observed `v` rejects at level `beta = 1 - confidence` is an interval
[0, eps_hat), and eps_hat is the reported lower bound: if the true epsilon
were at or above eps_hat, observing that many correct guesses would have
probability at most beta. The bound is found by bisection, the binomial tail
computed exactly with `scipy.stats.binom` (through the count of wrong guesses,
Bin(r, 1 - q), so that 1 - q is not rounded away when it is tiny).

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
the guesses kept are about as accurate as q(epsilon), which a Gaussian
mechanism allows only for a few of them. A one-run bound below the
accountant's epsilon therefore proves little; one above it proves the
accounting (or the code) wrong.
"""

from __future__ import annotations

import math

import scipy.special
import scipy.stats

# Bisection stops when the bracket is this narrow; the lower end is reported, so
# the bound errs on the small side by at most this much.
_EPS_TOL = 1e-9


def _check_confidence(confidence: float) -> float:
    """Validate `confidence` and return the significance level beta = 1 - confidence."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    return 1.0 - confidence


def _check_counts(num_guesses: int, num_correct: int, num_canaries: int | None) -> None:
    if int(num_guesses) != num_guesses or num_guesses < 0:
        raise ValueError(f"num_guesses={num_guesses} must be an integer >= 0")
    if int(num_correct) != num_correct or not 0 <= num_correct <= num_guesses:
        raise ValueError(f"num_correct={num_correct} must be an integer in [0, num_guesses={num_guesses}]")
    if num_canaries is not None and (int(num_canaries) != num_canaries or num_canaries < num_guesses):
        raise ValueError(f"num_canaries={num_canaries} must be an integer >= num_guesses={num_guesses}")


def guess_accuracy(epsilon: float) -> float:
    """q(epsilon) = e^eps / (1 + e^eps): the best accuracy per guess that epsilon-DP allows."""
    return float(scipy.special.expit(epsilon))


def one_run_p_value(num_guesses: int, num_correct: int, epsilon: float, *, delta: float = 0.0) -> float:
    """The theorem's bound on P[>= num_correct correct of num_guesses] if the run is (epsilon, delta)-DP.

    For delta = 0 this is the binomial tail P[Bin(r, q(epsilon)) >= v]. Small
    values reject "(epsilon, delta)-DP"; `epsilon_lower_bound` inverts it.
    """
    _check_counts(num_guesses, num_correct, None)
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon} must be >= 0")
    if delta != 0.0:
        raise NotImplementedError("delta > 0 is not implemented yet; only the pure (delta = 0) bound is")
    r, v = int(num_guesses), int(num_correct)
    # At least v right is at most r - v wrong; a wrong guess has probability
    # 1 - q = expit(-eps), accurate even where q rounds to 1.
    return float(scipy.stats.binom.cdf(r - v, r, scipy.special.expit(-epsilon)))


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
    `num_correct`, and at most the bound of a perfect guesser with the same
    number of guesses, logit((1 - confidence)^(1 / num_guesses)).

    `num_canaries` (m, the canaries planted, guessed on or not) only enters
    the delta > 0 correction; with delta = 0 it is optional and only checked
    to be >= `num_guesses`.
    """
    beta = _check_confidence(confidence)
    _check_counts(num_guesses, num_correct, num_canaries)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta={delta} must be in [0, 1)")
    if delta > 0.0:
        raise NotImplementedError("delta > 0 is not implemented yet; only the pure (delta = 0) bound is")

    def rejects(eps: float) -> bool:
        return one_run_p_value(num_guesses, num_correct, eps) <= beta

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
    if int(num_guesses) != num_guesses or num_guesses < 1:
        raise ValueError(f"num_guesses={num_guesses} must be an integer >= 1")
    log_q = math.log(beta) / num_guesses  # < 0
    return -math.log(math.expm1(-log_q))  # logit(q) = -log(1/q - 1)
