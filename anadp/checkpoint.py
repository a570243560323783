"""Orbax checkpoints of a run in `workdir/checkpoints/`: the train state, the
privacy ledger and the run record (the run's secrets, the accounting terms a
resume must find unchanged, the literal variant's realised ledger).

Checkpoints hold the run's secret randomness: the folder is owner-only, and
`load_trainable` reads the trainable parameters alone.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from anadp import accounting, models, sharding
from anadp.noise import Mechanism


def open_manager(workdir: str, create: bool = True):
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not create and not os.path.isdir(directory):
        raise ValueError(f"workdir={workdir!r} has no checkpoint")  # reading must not create the folder
    if sharding.is_main_process() and create:
        # Checkpoints hold the run's secret randomness (and, like the data, they
        # are not for publication): owner-only.
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


def json_ready(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def save_checkpoint(manager, step: int, state, ledger: accounting.PrivacyLedger, run: dict) -> None:
    """Saves the train state, the privacy ledger and `run` (the secrets and the accounting terms)."""
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            ledger=ocp.args.JsonSave(json_ready(ledger.state_dict())),
            run=ocp.args.JsonSave(run),
        ),
        force=True,
    )
    manager.wait_until_finished()


def ledger_from_state(state: dict) -> accounting.PrivacyLedger:
    state = dict(state)
    if state.get("reference_noise_multiplier") is None:
        state["reference_noise_multiplier"] = float("nan")
    return accounting.PrivacyLedger.from_state_dict(state)


def restore_checkpoint(manager, template):
    """(step, state, ledger, run) of the latest checkpoint, or None when there is none.

    `template`: the train state (a NamedTuple); the state comes back as its type."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template._asdict())
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), ledger=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()
            ),
        )
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} cannot be resumed by this version "
            f"(it lacks the run's secrets or accounting terms: {e}); use a new workdir"
        ) from None
    return step, type(template)(**restored["state"]), ledger_from_state(restored["ledger"]), dict(restored["run"])


def load_checkpoint(workdir: str, step: int | None = None) -> dict:
    """A run's checkpoint as saved ({"state", "ledger", "run"}), latest by default."""
    import orbax.checkpoint as ocp

    manager = open_manager(workdir, create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"workdir={workdir!r} has no checkpoint")
    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), ledger=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()
        ),
    )


def _read_only_manager(workdir: str):
    """A checkpoint manager that reads a workdir and never creates or deletes anything in it."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise ValueError(f"workdir={workdir!r} has no checkpoints/ folder")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
    return ocp.CheckpointManager(directory, options=options)


def latest_checkpoint_step(workdir: str) -> int | None:
    """The step of a run's latest checkpoint (None when it has none)."""
    return _read_only_manager(workdir).latest_step()


def load_trainable(workdir: str, template: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, trainable params) of a run's checkpoint (latest by default), read alone.

    `template`: the trainable params' tree (arrays or ShapeDtypeStructs), as
    `models.partition` gives it for the run's config. Only `state/trainable` is
    read (an orbax partial restore): the optimiser state, the mechanism's state
    (its noise key) and the run record (the secrets, the ledger) stay on disk, so
    no caller can pass them on by accident. The manager is read-only: loading a
    run neither creates nor changes anything in its workdir.
    """
    import orbax.checkpoint as ocp

    manager = _read_only_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"workdir={workdir!r} has no checkpoint")
    directory = manager.directory
    wanted = {"trainable": jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(
            f"the checkpoint at step {step} in {directory} does not hold the trainable parameters this "
            f"config implies ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    trainable = restored["state"]["trainable"]
    got_leaves = models.flatten_params(trainable)
    for path, want in models.flatten_params(wanted["trainable"]).items():
        got = got_leaves.get(path)
        if got is None or tuple(np.shape(got)) != tuple(want.shape):
            raise ValueError(
                f"the checkpoint at step {step} in {directory} has {'/'.join(path)} of shape "
                f"{None if got is None else tuple(np.shape(got))}, the config implies {tuple(want.shape)}"
            )
    return step, trainable


def accounting_terms(noise_multiplier: float, mechanism: Mechanism, sampling_rate: float,
                     worst_case_scale: float, ledger: accounting.PrivacyLedger) -> dict:
    """Everything that decides how a step is accounted, as a resume must find it unchanged."""
    from importlib import metadata

    return {
        "noise_multiplier": float(noise_multiplier),
        "sampling_rate": float(sampling_rate),
        "clipping": mechanism.clipping,
        "profile_noise_multiplier": mechanism.profile_noise_multiplier,
        "worst_case_scale": float(worst_case_scale),
        "warmup_steps": int(mechanism.warmup_steps),
        "accountant": ledger.accountant,
        "ledger_grid": ledger.grid,
        "pld_discretization": ledger.pld_discretization,
        "dp_accounting_version": metadata.version("dp-accounting"),
    }


def check_same_accounting(saved: dict, live: dict, workdir: str) -> None:
    """Refuses to resume a run whose steps would now be accounted differently."""
    changed = [
        f"{k}: {saved.get(k)!r} in the checkpoint, {live.get(k)!r} now"
        for k in sorted(set(saved) | set(live))
        if saved.get(k) != live.get(k)
    ]
    if changed:
        raise ValueError(
            f"workdir={workdir!r} was accounted differently ({'; '.join(changed)}); resuming would mix two "
            "accountings in one epsilon: use a new workdir (or the versions the run started with)"
        )
