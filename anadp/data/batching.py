"""Fixed-shape batches from the arrays of ``load_task``: the training loop's length
buckets (``bucket_length``, ``parse_buckets``, ``take_batch``) and ``iterate_batches``."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


def num_examples(split: Mapping[str, np.ndarray]) -> int:
    return int(len(split["labels"]))


def iterate_batches(
    split: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches with exactly ``batch_size`` rows (so a jitted step compiles
    once). Each batch has the split's arrays plus ``weights`` (float32, 1 for
    real rows, 0 for padding rows). Without ``drop_remainder`` the last,
    partial batch is completed with all-zero rows of weight 0 (for
    evaluation: weight the per-example results, or drop them with
    ``weights > 0``). ``shuffle`` permutes with ``np.random.default_rng(seed)``.

    (DP training samples its own batches - see ``anadp.sampling``; this is for
    evaluation and non-private baselines.)
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = num_examples(split)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        real = len(idx)
        if real < batch_size and drop_remainder:
            return
        batch = {}
        for key, arr in split.items():
            arr = np.asarray(arr)
            rows = arr[idx]
            if real < batch_size:
                pad = np.zeros((batch_size - real,) + arr.shape[1:], arr.dtype)
                rows = np.concatenate([rows, pad])
            batch[key] = rows
        weights = np.zeros(batch_size, np.float32)
        weights[:real] = 1.0
        batch["weights"] = weights
        yield batch


def bucket_length(lengths: np.ndarray, buckets: tuple[int, ...], max_length: int) -> int:
    """The smallest bucket that holds the longest sequence (max_length if none does)."""
    longest = int(np.max(lengths)) if len(lengths) else 1
    for b in buckets:
        if longest <= b <= max_length:
            return b
    return max_length


def parse_buckets(spec: str) -> tuple[int, ...]:
    return tuple(sorted(int(x) for x in spec.split(",") if x.strip()))


def take_batch(arrays: dict, indices: np.ndarray, length: int) -> dict:
    """Rows `indices` of the tokenised arrays, cut to `length` tokens (right padding)."""
    return {
        "input_ids": arrays["input_ids"][indices, :length],
        "attention_mask": arrays["attention_mask"][indices, :length],
        "token_type_ids": arrays["token_type_ids"][indices, :length],
        "labels": arrays["labels"][indices].astype(np.int32),
    }
