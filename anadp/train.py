"""The training loop: one run of (non-private | DP-SGD | ANADP) fine-tuning.

`run(config, workdir)` trains, evaluates, accounts and checkpoints, and leaves
in `workdir`:

    config.json       the resolved config (a rerun with another config is refused)
    labels.json       the class names, index = class id (a JSON list of strings)
    metrics.jsonl     one JSON object per logged step
    tensorboard/      the same public metrics as TensorBoard event files
    summary.json      final metrics, epsilon, delta, steps, wall time, versions
    checkpoints/      orbax checkpoints: everything a resume needs
    *.png             training curves; for ANADP the noise-scale heatmaps

(the files: `anadp.workdir`; the checkpoints: `anadp.checkpoint`). One step is
`train_step`, which `run` calls once a step: on the host it draws the step's
passes, accounts the step and drives the jitted pieces of `anadp.step_functions`.
The task and model come from `anadp.task_and_model`, the optimiser from
`anadp.optimizer`.

A run that fails before its first step is done takes away what it added, so
the corrected command starts as on a clean workdir.

What is written is public in the sense of METHOD.md: parameters, released
gradients' consequences, the allocation, epsilon, and metrics on the dev split.
The training loss of private batches is written only behind
`config.debug.log_private_diagnostics`, under keys starting with "nonprivate/".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anadp import accounting, checkpoint, importance, models, randomness, sampling, sharding
from anadp._validate import mechanism_from_config, validate_config
from anadp.clipping import GradientSum
from anadp.data.batching import bucket_length, parse_buckets, take_batch
from anadp.noise import Mechanism, group_values
from anadp.optimizer import make_optimizer
from anadp.progress import ProgressBar
from anadp.step_functions import StepFunctions, TrainState, make_step_functions
from anadp.task_and_model import load_task_and_model
from anadp.versions import versions
from anadp.workdir import FreshPaths, RunLog, TensorBoardLog, prepare_workdir, write_config, write_summary

# --- evaluation ----------------------------------------------------------------


def evaluate(fns: StepFunctions, trainable, frozen, split: dict, spec, batch_size: int, buckets, max_length) -> dict:
    """The task's metrics and the mean loss on one evaluation split."""
    n = len(split["labels"])
    rows = sharding.padded_batch_size(batch_size)  # a multiple of the device count
    logits_all = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        length = bucket_length(split["lengths"][idx], buckets, max_length)
        batch, _ = sharding.put_batch(
            lambda ids, idx=idx, length=length: take_batch(split, idx[ids], length), np.ones(len(idx)), rows
        )
        logits_all.append(sharding.to_host(fns.predict(trainable, frozen, batch))[: len(idx)])
    logits = np.concatenate(logits_all).astype(np.float64)
    labels = split["labels"].astype(np.int64)
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    metrics = dict(spec.compute_metrics(np.argmax(logits, axis=1), labels))
    metrics["loss"] = float(-np.mean(log_probs[np.arange(n), labels]))
    return metrics


def _scales_record(mechanism: Mechanism, state: TrainState, trainable_template) -> dict:
    """Per-group noise scales and importance diagnostics (all public) for the log."""
    groups = mechanism.groups(trainable_template)
    scales = np.asarray(group_values(state.mechanism.scales, groups))
    scores = np.asarray(mechanism.estimator.group_scores(state.mechanism.importance, groups))
    return {
        "noise_scales": dict(zip(groups.names, scales.round(6).tolist())),
        "importance_weight_corr": importance.importance_weight_correlation(scores, state.trainable, groups),
        "importance": dict(zip(groups.names, scores.tolist())),
    }


# --- one step ------------------------------------------------------------------


@dataclasses.dataclass
class StepInputs:
    """What a step reads besides the train state: the compiled functions, the
    frozen parameters (on the devices), the sampler and the training arrays."""

    fns: StepFunctions
    mechanism: Mechanism | None
    frozen: Any
    sampler: sampling.PoissonSampler
    data: dict  # the training split's arrays, "lengths" included
    buckets: tuple[int, ...]
    max_length: int
    device_rows: int  # rows per pass on the devices: sharding.padded_batch_size
    dropout_base: Any = None  # a PRNG key, for per-example dropout keys; None: no dropout


def device_passes(inputs: StepInputs, step: int):
    """`step`'s Poisson draw as passes on the devices: (physical batch, batch, mask)
    each, the rows sorted by length and cut to their length bucket."""
    lengths = inputs.data["lengths"]
    for pass_index, physical in enumerate(inputs.sampler.batches(step, sort_by=lengths)):
        real_rows = physical.indices[physical.mask.astype(bool)]
        length = bucket_length(lengths[real_rows], inputs.buckets, inputs.max_length)
        dropout_keys = None
        if inputs.dropout_base is not None:
            key = jax.random.fold_in(jax.random.fold_in(inputs.dropout_base, step), pass_index)
            dropout_keys = np.asarray(jax.random.split(key, len(physical.indices)))

        def load_rows(ids, indices=physical.indices, length=length, dropout_keys=dropout_keys):
            # Every host draws the same global batch; each loads only its devices' rows.
            rows = take_batch(inputs.data, indices[ids], length)
            if dropout_keys is not None:
                rows["dropout_key"] = dropout_keys[ids]
            return rows

        batch, mask = sharding.put_batch(load_rows, physical.mask, inputs.device_rows)
        yield physical, batch, mask


def sum_passes(fns: StepFunctions, mechanism: Mechanism | None, state: TrainState, frozen, passes) -> GradientSum:
    """The (clipped) gradient sums of one step's passes, added; `passes` yields
    (batch, mask) pairs on the devices."""
    scales = mechanism.clip_scales(state.mechanism) if mechanism else None
    summed = None
    for batch, mask in passes:
        part = fns.accumulate(state.trainable, frozen, scales, batch, mask)
        summed = part if summed is None else fns.add(summed, part)
    return summed


def train_step(inputs: StepInputs, state: TrainState, step: int, ledgers: RunAccounting | None = None):
    """One training step on the host: draws the step's passes from the sampler,
    sums their clipped gradients, records the step in `ledgers` and applies the
    update. Returns (new state, realised batch size); the realised size of a
    private batch is not public."""
    realised = 0

    def passes():
        nonlocal realised
        for physical, batch, mask in device_passes(inputs, step):
            realised += physical.num_real
            yield batch, mask

    summed = sum_passes(inputs.fns, inputs.mechanism, state, inputs.frozen, passes())
    if ledgers is not None:
        ledgers.record(step, state)  # before `apply`, which donates the state
    state = inputs.fns.apply(state, summed, sharding.replicate(np.float32(realised)))
    return state, realised


# --- the run's accounting ---------------------------------------------------------


class RunAccounting:
    """A run's privacy accounting: the mechanism and its noise multiplier, the
    ledger, for the literal variant the realised-sequence ledger, and the terms a
    resume must find unchanged. For non-private training: no mechanism."""

    def __init__(self, config, trainable, num_train: int, sampling_rate: float, total_steps: int, delta: float):
        p = config.privacy
        self.private = p.method != "non_private"
        self.delta, self.sampling_rate = delta, sampling_rate
        self.mechanism = None
        self.noise_multiplier = None
        self.worst_case_scale = 1.0
        if self.private:
            self.mechanism = mechanism_from_config(config, noise_multiplier=p.noise_multiplier,
                                                   expected_batch_size=sampling_rate * num_train)
            if p.noise_multiplier == 0:  # 0: calibrate sigma to the target epsilon
                self.mechanism = self.mechanism.calibrated(p.epsilon, delta, sampling_rate, total_steps, p.accountant)
            self.noise_multiplier = self.mechanism.noise_multiplier
            self.worst_case_scale = self.mechanism.worst_case_scale(trainable)
        # The ledger's anchor is the multiplier at uniform scales; the literal variant
        # also keeps the realised sequence, which is not a guarantee (METHOD.md).
        reference = self.step_multiplier(0) if self.private else None
        self.ledger = accounting.PrivacyLedger(
            p.accountant, reference_noise_multiplier=reference, pld_discretization=accounting.DEFAULT_PLD_DISCRETIZATION
        )
        m = self.mechanism
        self.literal = m is not None and m.adaptive and m.clipping == "global"
        self.realised_ledger = (
            accounting.PrivacyLedger(p.accountant, reference_noise_multiplier=reference) if self.literal else None
        )
        self.terms = checkpoint.accounting_terms(
            self.noise_multiplier, m, sampling_rate, self.worst_case_scale, self.ledger
        ) if self.private else {}

    def step_multiplier(self, step: int, scales: Any = None) -> float:
        """The step's accounted multiplier (worst case), or with `scales` its realised one."""
        if scales is None:
            return self.mechanism.accounted_noise_multiplier(step, self.worst_case_scale)
        return self.mechanism.effective_noise_multiplier(scales)

    def record(self, step: int, state: TrainState) -> None:
        """Accounts `step`, taken from `state` (its realised scales for the literal variant)."""
        if self.realised_ledger is not None:
            scales_used = np.asarray(jax.tree_util.tree_leaves(state.mechanism.scales))
            self.realised_ledger.record(self.sampling_rate, self.step_multiplier(step, scales_used))
        if self.private:
            self.ledger.record(self.sampling_rate, self.step_multiplier(step))

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.delta) if self.private else float("inf")

    def run_record(self, secrets: randomness.RunSecrets) -> dict:
        """What a checkpoint saves besides the state and the ledger."""
        realised = self.realised_ledger
        return {
            "secrets": secrets.state_dict(),
            "accounting": self.terms,
            "realised_ledger": checkpoint.json_ready(realised.state_dict()) if realised else None,
        }

    def resume(self, ledger: accounting.PrivacyLedger, run_record: dict, workdir: str) -> None:
        """Takes over a checkpoint's ledgers, once its accounting terms are the run's."""
        checkpoint.check_same_accounting(run_record["accounting"], self.terms, workdir)
        self.ledger = ledger
        if self.realised_ledger is not None:
            self.realised_ledger = checkpoint.ledger_from_state(run_record["realised_ledger"])


# --- the run -----------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains one configuration end to end (resuming from `workdir` if it holds a checkpoint).

    A run that fails before its first step is done leaves `workdir` as it found it."""
    start_time = time.time()
    validate_config(config)
    fresh = FreshPaths(workdir)
    try:
        return _run(config, workdir, start_time, fresh)
    except BaseException:
        fresh.remove()
        raise


def _restore_or_start(manager, optimizer, trainable, ledgers: RunAccounting, config, workdir: str):
    """(step, state, secrets, restored) from the latest checkpoint, or a fresh start
    with new secrets (restored False)."""
    p, mechanism = config.privacy, ledgers.mechanism
    template = TrainState(
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        mechanism=mechanism.init(trainable, noise_key=jnp.zeros([2], jnp.uint32)) if mechanism else (),
    )
    restored = checkpoint.restore_checkpoint(manager, template)
    if restored is not None:
        start_step, state, ledger, run_record = restored
        ledgers.resume(ledger, run_record, workdir)
        secrets = randomness.RunSecrets.from_state_dict(run_record["secrets"])
        print(f"resumed from step {start_step} (checkpoint in {workdir})", file=sys.stderr)
    else:
        start_step = 0
        secrets = randomness.draw(p.randomness, config.train.seed)
        state = template._replace(mechanism=mechanism.init(template.trainable, secrets.noise_key) if mechanism else ())
    if p.randomness == "seeded" and sharding.is_main_process():
        print(randomness.SEEDED_WARNING, file=sys.stderr)
    return start_step, state, secrets, restored is not None


def _step_inputs(config, fns: StepFunctions, mechanism, frozen, sampler, train_split: dict) -> StepInputs:
    t = config.train
    inputs = StepInputs(
        fns, mechanism, frozen, sampler, train_split, parse_buckets(config.data.bucket_lengths), config.data.max_length,
        # Rows per pass on the devices: the physical batch padded (mask 0) to a
        # multiple of the device count (and of the per-device microbatch).
        device_rows=sharding.padded_batch_size(t.physical_batch_size, t.microbatch_size),
        dropout_base=jax.random.PRNGKey(t.seed + 1_000_003) if config.model.dropout else None,
    )
    if inputs.device_rows != t.physical_batch_size and sharding.is_main_process():
        print(f"train.physical_batch_size={t.physical_batch_size} padded to {inputs.device_rows} rows "
              f"for {sharding.num_devices()} devices", file=sys.stderr)
    return inputs


def _run(config: ml_collections.ConfigDict, workdir: str, start_time: float, fresh: FreshPaths) -> dict:
    prepare_workdir(workdir, config)
    t = config.train
    task, delta, model, (trainable, frozen) = load_task_and_model(config, workdir)
    num_train = len(task.train["labels"])
    sampling_rate = sampling.sampling_rate_for(t.expected_batch_size, num_train)
    total_steps = t.steps if t.steps > 0 else sampling.steps_for_epochs(t.epochs, sampling_rate)
    ledgers = RunAccounting(config, trainable, num_train, sampling_rate, total_steps, delta)
    mechanism, private = ledgers.mechanism, ledgers.private

    optimizer = make_optimizer(t, total_steps)
    manager = checkpoint.open_manager(workdir)
    start_step, state, secrets, resumed = _restore_or_start(manager, optimizer, trainable, ledgers, config, workdir)
    sampler = sampling.PoissonSampler(num_train, sampling_rate, t.physical_batch_size, secrets.sampler_seed)

    def save(step: int, state: TrainState) -> None:
        checkpoint.save_checkpoint(manager, step, jax.device_get(state), ledgers.ledger, ledgers.run_record(secrets))

    write_config(workdir, config, task.spec.label_names)
    if not resumed:
        # The secrets are saved before anything is released, so a crash at any
        # point resumes with the same randomness (and replays the same releases).
        save(0, state)
    state, frozen = sharding.replicate(state), sharding.replicate(frozen)
    fns = make_step_functions(model, mechanism, optimizer, config)
    log = RunLog(os.path.join(workdir, "metrics.jsonl"), start_step)
    board = TensorBoardLog(os.path.join(workdir, "tensorboard"), start_step,
                           include_nonprivate=config.debug.log_private_diagnostics)
    inputs = _step_inputs(config, fns, mechanism, frozen, sampler, task.train)

    def eval_all(trainable_now) -> dict:
        return {name: evaluate(fns, trainable_now, frozen, split, task.spec, t.eval_batch_size, inputs.buckets,
                               inputs.max_length) for name, split in task.eval_splits.items()}

    last_eval: dict = {}
    epsilon_now = ledgers.epsilon() if private else 0.0
    progress = ProgressBar(total_steps, start_step, private)
    for step in range(start_step, total_steps):
        state, realised = train_step(inputs, state, step, ledgers)
        done = step + 1
        evaluating = done % t.eval_every == 0 or done == total_steps
        if evaluating:
            last_eval = eval_all(state.trainable)
            record = _eval_record(config, ledgers, done, realised, last_eval, state, trainable, start_time)
            if private:
                epsilon_now = record["epsilon"]
            log.write(record)
            board.write(record)
        progress.update(done, last_eval, epsilon_now, task.spec.main_metric)
        # Whatever was logged is covered by a checkpoint's ledger and secrets.
        if evaluating or done % t.checkpoint_every == 0:
            save(done, state)
        fresh.keep()
    fresh.keep()
    progress.close()
    board.close()

    if not last_eval:  # resumed after the final step: evaluate the restored parameters
        last_eval = eval_all(state.trainable)
    summary = _summary(config, ledgers, task, model, trainable, last_eval, total_steps, start_time)
    write_summary(workdir, summary, log.records)
    return summary


def _eval_record(config, ledgers: RunAccounting, step: int, realised: int, evaluation: dict, state: TrainState,
                 trainable_template, start_time: float) -> dict:
    """The metrics.jsonl record of an evaluated step (keys under "nonprivate/" are not public)."""
    private, mechanism = ledgers.private, ledgers.mechanism
    record: dict = {"step": step}
    if not private or config.debug.log_private_diagnostics:
        record["train_batch_size" if not private else "nonprivate/realised_batch_size"] = realised
    record["eval"] = evaluation
    if private:
        record["epsilon"] = ledgers.epsilon()
    if mechanism is not None and mechanism.adaptive:
        record.update(_scales_record(mechanism, state, trainable_template))
    # Wall-clock time depends on the realised batch sizes and bucket lengths.
    record["nonprivate/elapsed_s"] = round(time.time() - start_time, 2)
    return record


def _summary(config, ledgers: RunAccounting, task, model, trainable, last_eval: dict, total_steps: int,
             start_time: float) -> dict:
    p, private, mechanism = config.privacy, ledgers.private, ledgers.mechanism
    num_train = len(task.train["labels"])
    primary_split = next(iter(last_eval))
    summary = {
        "task": config.data.task,
        "method": p.method,
        "finetune": config.model.finetune,
        "model": config.model.name,
        "pooling": model.pooling,  # what the model used: config.model.pooling "auto" resolved
        "epsilon": ledgers.epsilon(),
        "target_epsilon": p.epsilon if private and p.noise_multiplier == 0 else None,
        "delta": ledgers.delta if private else None,
        "noise_multiplier": ledgers.noise_multiplier,
        "clipping": mechanism.clipping if mechanism else None,
        "randomness": p.randomness,
        "steps": total_steps,
        "sampling_rate": ledgers.sampling_rate,
        "expected_batch_size": ledgers.sampling_rate * num_train,
        "num_train": num_train,
        "num_trainable_params": models.count_params(trainable),
        "eval": last_eval[primary_split],
        "eval_splits": last_eval,
        "main_metric": task.spec.main_metric,
        "seed": config.train.seed,
        "nonprivate/wall_time_s": round(time.time() - start_time, 2),
        "versions": versions(),
        "config": json.loads(config.to_json()),
    }
    if ledgers.literal:
        # Not guarantees: the realised sequence was chosen adaptively, and DP-SGD's
        # figure assumes uniform noise. The run's epsilon is the worst case above.
        summary["worst_case_noise_scale"] = ledgers.worst_case_scale
        summary["epsilon_realised_sequence_not_a_guarantee"] = ledgers.realised_ledger.epsilon(ledgers.delta)
        summary["dp_sgd_epsilon_same_sigma"] = accounting.compute_epsilon(
            ledgers.noise_multiplier, ledgers.sampling_rate, total_steps, ledgers.delta, accountant=p.accountant
        )
    return summary
