"""The checks of a run's config, before any work: a bad value is refused with a
message that names its field (`validate_config`), and the mechanism the privacy
group describes (`mechanism_from_config`, which also checks the ANADP fields).

Numbers are checked by the library's one policy (`anadp._checks`: an integer
field must hold an integer, a real field a real number, never NaN); the
refusal names the config field and what it accepts."""

from __future__ import annotations

import ml_collections

from anadp import _checks, models, randomness
from anadp import data as data_lib
from anadp.clipping import CLIP_FNS, CLIPPING_MODES
from anadp.noise import Mechanism

METHODS = ("non_private", "dp_sgd", "anadp")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
# How the DP step gets its clipped sum: "vmap" (per-example gradients,
# clipping.clipped_grad_sum) or "ghost" (ghost norms + book-keeping, anadp.ghost).
CLIPPING_ENGINES = ("vmap", "ghost")


def _bad(field: str, value, allowed: str):
    raise ValueError(f"config.{field}={value!r} is invalid: {allowed}")


def _integer(field: str, value, minimum: int, allowed: str | None = None) -> None:
    """An integer field (`_checks.integer`) of at least `minimum`."""
    try:
        _checks.integer(field, value, minimum)
    except ValueError:
        _bad(field, value, allowed or f"must be >= {minimum}")


def _real(field: str, value, interval: str, allowed: str) -> None:
    """A real field (`_checks.in_interval`) in `interval`, e.g. "(0, inf)"."""
    try:
        _checks.in_interval(field, value, interval)
    except ValueError:
        _bad(field, value, allowed)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a bad configuration with a message naming the field."""
    p, d, m = config.privacy, config.data, config.model
    if d.task not in data_lib.known_tasks():
        _bad("data.task", d.task, f"known tasks are {sorted(data_lib.known_tasks())}")
    if p.method not in METHODS:
        _bad("privacy.method", p.method, f"must be one of {METHODS}")
    if m.finetune not in models.FINETUNE_MODES:
        _bad("model.finetune", m.finetune, f"must be one of {models.FINETUNE_MODES}")
    if m.pooling not in models.POOLING_CHOICES:
        _bad("model.pooling", m.pooling, f"must be one of {models.POOLING_CHOICES}")
    if m.head_init not in models.HEAD_INITS:
        _bad("model.head_init", m.head_init, f"must be one of {models.HEAD_INITS}")
    _integer("model.lora_rank", m.lora_rank, 1)
    _real("model.lora_alpha", m.lora_alpha, "(0, inf)", "must be > 0 (the adapter's scale is lora_alpha / lora_rank)")
    _real("model.lora_dropout", m.lora_dropout, "[0, 1)", "must be in [0, 1)")
    _validate_data(d)
    if p.method != "non_private":
        _validate_privacy(config)
    randomness.check_mode(p.randomness)
    _validate_train(config)


def _validate_privacy(config: ml_collections.ConfigDict) -> None:
    """The fields of a private method (DP-SGD or ANADP)."""
    p = config.privacy
    _real("privacy.noise_multiplier", p.noise_multiplier, "[0, inf)", "must be >= 0 (0: calibrate to epsilon)")
    if p.noise_multiplier == 0 and not p.epsilon > 0:
        _bad("privacy.epsilon", p.epsilon, "must be > 0 (or set privacy.noise_multiplier > 0)")
    _real("privacy.delta", p.delta, "[0, 1)", "must be in (0, 1/N), or 0 for the default")
    _real("privacy.l2_norm_clip", p.l2_norm_clip, "(0, inf)", "must be > 0")
    if p.accountant not in ("pld", "rdp"):
        _bad("privacy.accountant", p.accountant, "must be 'pld' or 'rdp'")
    # Checked for every private method, although only ANADP reads it: a typo
    # must not pass silently until the day the method changes.
    if p.clipping not in CLIPPING_MODES:
        _bad("privacy.clipping", p.clipping, f"must be one of {CLIPPING_MODES}")
    if p.clip_fn not in CLIP_FNS:
        _bad("privacy.clip_fn", p.clip_fn, f"must be one of {CLIP_FNS}")
    _real("privacy.automatic_r", p.automatic_r, "(0, inf)", "must be in (0, inf)")
    if p.method == "anadp":
        # Mechanism validates the ANADP fields; re-raise naming the config group.
        try:
            mechanism_from_config(config, noise_multiplier=1.0, expected_batch_size=1.0)
        except ValueError as e:
            raise ValueError(f"config.privacy: {e}") from None


def _validate_train(config: ml_collections.ConfigDict) -> None:
    """The train group, and the longest sequence."""
    p, t, d = config.privacy, config.train, config.data
    _real("train.expected_batch_size", t.expected_batch_size, "(0, inf)", "must be > 0")
    _integer("train.physical_batch_size", t.physical_batch_size, 1)
    allowed = f"must divide train.physical_batch_size={t.physical_batch_size}"
    _integer("train.microbatch_size", t.microbatch_size, 1, allowed)
    if t.physical_batch_size % t.microbatch_size:
        _bad(
            "train.microbatch_size",
            t.microbatch_size,
            f"must divide train.physical_batch_size={t.physical_batch_size}",
        )
    _integer("train.steps", t.steps, 0, "must be > 0, or 0 with train.epochs > 0")
    if t.steps == 0 and not t.epochs > 0:
        _bad("train.steps", t.steps, "must be > 0, or 0 with train.epochs > 0")
    if t.optimizer not in OPTIMIZERS:
        _bad("train.optimizer", t.optimizer, f"must be one of {OPTIMIZERS}")
    if t.dtype not in models.COMPUTE_DTYPES:
        _bad("train.dtype", t.dtype, f"must be one of {models.COMPUTE_DTYPES}")
    engine = t.clipping_engine
    if engine not in CLIPPING_ENGINES:
        _bad("train.clipping_engine", engine, f"must be one of {CLIPPING_ENGINES}")
    if engine == "ghost" and config.model.dropout and p.method != "non_private":
        _bad("train.clipping_engine", engine, "'ghost' needs model.dropout=False (no per-example dropout)")
    if t.schedule not in SCHEDULES:
        _bad("train.schedule", t.schedule, f"must be one of {SCHEDULES}")
    _real("train.learning_rate", t.learning_rate, "(0, inf)", "must be > 0")
    _integer("train.lr_warmup_steps", t.lr_warmup_steps, 0)
    _real("train.weight_decay", t.weight_decay, "[0, inf)", "must be >= 0")
    for field in ("eval_every", "checkpoint_every", "eval_batch_size"):
        _integer(f"train.{field}", t[field], 1)
    _integer("data.max_length", d.max_length, 2)


def _validate_data(d: ml_collections.ConfigDict) -> None:
    """The file fields belong to the csv / jsonl tasks, data.dir to the others."""
    if d.task not in data_lib.FILE_TASKS:
        for field in ("train_file", "dev_file"):
            if d[field]:
                _bad(f"data.{field}", d[field], f"must be empty unless data.task is one of {data_lib.FILE_TASKS}")
        return
    if not d.train_file:
        _bad("data.train_file", d.train_file, f"must name your {d.task.upper()} file for data.task={d.task}")
    if d.dir:
        _bad("data.dir", d.dir, f"must be empty with data.task={d.task} (data.train_file is a path of its own)")
    for field in ("text_column", "label_column"):
        if not d[field].strip():
            _bad(f"data.{field}", d[field], "must name a column")
    if d.label_column in (d.text_column, d.text_pair_column):
        _bad("data.label_column", d.label_column, "must differ from data.text_column and data.text_pair_column")
    if d.text_pair_column == d.text_column:
        _bad("data.text_pair_column", d.text_pair_column, "must differ from data.text_column (or be empty)")


def mechanism_from_config(config, *, noise_multiplier: float, expected_batch_size: float) -> Mechanism:
    """The mechanism `config.privacy` describes (DP-SGD: global clipping, no adaptation)."""
    p = config.privacy
    adaptive = p.method == "anadp"
    return Mechanism(
        l2_norm_clip=p.l2_norm_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        adaptive=adaptive,
        clipping=p.clipping if adaptive else "global",
        gamma=p.gamma,
        rho=p.rho,
        warmup_steps=p.warmup_steps,
        grouping=p.grouping,
        importance=p.importance,
        beta1=p.beta1,
        beta2=p.beta2,
        profile_noise_ratio=p.profile_noise_ratio,
        clip_fn=p.clip_fn,
        automatic_r=p.automatic_r,
    )
