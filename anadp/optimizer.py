"""The optimiser of `config.train`: the learning-rate schedule (linear warm-up, then
constant, linear or cosine decay to the last step) and the optax optimiser."""

from __future__ import annotations

import optax


def make_optimizer(train_config, total_steps: int) -> optax.GradientTransformation:
    lr = train_config.learning_rate
    warmup = train_config.lr_warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    if train_config.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif train_config.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps)
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
        if warmup > 0
        else after
    )
    if train_config.optimizer == "adam":
        return optax.adam(schedule)
    if train_config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=train_config.weight_decay)
    return optax.sgd(schedule)
