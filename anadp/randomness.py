"""The secret randomness of a run: the noise key and the Poisson sampler's seed.

Anyone who can regenerate the noise of a release subtracts it and sees the
exact clipped sum, so against them the reported epsilon is infinite; two runs
that share noise can be combined to cancel it. Hence two modes
(`config.privacy.randomness`, METHOD.md "Randomness"):

- `secure` (the default): both come from the operating system's entropy
  (`secrets`) when a run starts. They are written only to the run's
  checkpoints (needed for an exact resume, and owner-only), never to a config,
  summary, metric, log or plot.
- `seeded`: both are derived from the public `train.seed`, exactly as before
  this module existed, for reproducible research and paired comparisons
  (pairs then share their batches and noise). Such a run is private only
  against someone who lacks its config, and says so in every output.

Model initialisation and dropout stay seeded from `train.seed` in both modes:
they do not depend on the data, and the guarantee does not rest on them.

On several hosts, process 0 draws the secure values and broadcasts them: every
process must sample the same batch and add the same noise.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import numpy as np

RANDOMNESS_MODES = ("secure", "seeded")

# The warning a seeded run prints (and the reason summary.json records the mode).
SEEDED_WARNING = (
    "warning: privacy.randomness=seeded: the noise and the batches are derived from train.seed, so anyone "
    "who has this run's config can regenerate them; the reported epsilon holds only against those who do not"
)


def check_mode(mode: str) -> str:
    if mode not in RANDOMNESS_MODES:
        raise ValueError(f"config.privacy.randomness={mode!r} is invalid: must be one of {RANDOMNESS_MODES}")
    return mode


@dataclasses.dataclass(frozen=True)
class RunSecrets:
    """What an adversary must not know. `repr` shows neither value, so a log line cannot leak them.

    Attributes:
      noise_key: the mechanism's initial PRNG key, uint32[2] (a raw threefry key).
      sampler_seed: the Poisson sampler's seed, a non-negative int (128 bits when secure).
    """

    noise_key: np.ndarray = dataclasses.field(repr=False)
    sampler_seed: int = dataclasses.field(repr=False)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe form for the checkpoint (a 128-bit int does not survive JSON numbers)."""
        return {
            "noise_key": [int(x) for x in np.asarray(self.noise_key, np.uint32).reshape(-1)],
            "sampler_seed": format(self.sampler_seed, "x"),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RunSecrets:
        key = np.asarray([int(x) for x in state["noise_key"]], np.uint32)
        if key.shape != (2,):
            raise ValueError(f"a checkpoint's noise_key must have 2 words, found {key.shape}")
        return cls(noise_key=key, sampler_seed=int(str(state["sampler_seed"]), 16))


def seeded(seed: int) -> RunSecrets:
    """The values a seeded run uses: `PRNGKey(seed)` and the sampler seeded with `seed`."""
    import jax

    return RunSecrets(noise_key=np.asarray(jax.random.PRNGKey(seed), np.uint32), sampler_seed=int(seed))


def secure() -> RunSecrets:
    """Fresh values from the operating system's entropy: 64 bits of key, 128 of sampler seed."""
    return RunSecrets(
        noise_key=np.asarray([secrets.randbits(32), secrets.randbits(32)], np.uint32),
        sampler_seed=secrets.randbits(128),
    )


def draw(mode: str, seed: int) -> RunSecrets:
    """A new run's secrets; with several processes, process 0's values on every process."""
    if check_mode(mode) == "seeded":
        return seeded(seed)
    drawn = secure()
    import jax

    if jax.process_count() == 1:
        return drawn
    from jax.experimental import multihost_utils

    # Four 32-bit words of sampler seed plus the two key words, sent as one array.
    words = [(drawn.sampler_seed >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    packed = np.asarray([*drawn.noise_key.tolist(), *words], np.uint32)
    packed = np.asarray(multihost_utils.broadcast_one_to_all(packed), np.uint32)
    seed_value = sum(int(w) << (32 * i) for i, w in enumerate(packed[2:].tolist()))
    return RunSecrets(noise_key=packed[:2], sampler_seed=seed_value)
