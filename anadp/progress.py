"""The run's progress bar on stderr (the main process only)."""

from __future__ import annotations

import sys

from anadp import sharding


class ProgressBar:
    """A tqdm bar showing step, dev loss, epsilon so far and the last dev metric."""

    def __init__(self, total: int, initial: int, private: bool):
        from tqdm import tqdm

        # The rate and times depend on the realised batch sizes: marked as non-private.
        timing = "{elapsed}<{remaining}, {rate_fmt}" + ("; timing non-private" if private else "")
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr,
                        disable=not sharding.is_main_process(),
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [" + timing + "{postfix}]")

    def update(self, step: int, last_eval: dict, epsilon: float, main_metric: str) -> None:
        postfix = {"eps": f"{epsilon:.3g}"}
        if last_eval:
            first = next(iter(last_eval.values()))
            postfix["dev_loss"] = f"{first['loss']:.4f}"
            postfix[f"dev_{main_metric}"] = f"{first[main_metric]:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
