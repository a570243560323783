"""End-to-end membership audit of real fine-tuning runs, one training run per method.

The one-run audit of Steinke, Nasr and Jagielski (2023; `anadp.audit_one_run`)
plants `m` canaries in the training set, each included independently with
probability 1/2, trains once, and turns an auditor's guesses about which
canaries were trained on into an epsilon lower bound. Here the training set
is Rotten Tomatoes' train split (the rows and the dev split the
`rotten_tomatoes` task uses) plus the included canaries, given to `launch.py`
as a CSV task; every row of the plan (non-private; DP-SGD and ANADP at
epsilon 1, 3, 8; the literal global-clipping variant at epsilon 3, its sigma
calibrated like DP-SGD's) is one training run.

Canaries are sentences of random words from the public dev split, each with a
random label: a model fits one only by memorising it. After training, a
canary's score is minus the loss of its label (higher: more likely a member).
The auditor guesses "in" for the k/2 highest scores and "out" for the k/2
lowest, for each k of a list fixed in advance (Bonferroni over the list), and
the bound is at 95% confidence with the delta of the claim it is tested
against (non-private rows: the default delta for the training set's size).
AUC and TPR at 1% FPR of the same scores are reported beside it.

Writes into --out:
  train.csv, dev.csv   the CSV task (text,label); dev.csv is the task's dev split, unchanged
  canaries.json        all m canaries, their inclusion bits, the seeds and settings
  runs/<row>/          each row's workdir (command.txt, log.txt, canary_scores.json)
  membership_audit.md, membership_audit.csv   the table, the exact command and the git commit

Rows whose summary.json exists are skipped, so an interrupted audit resumes;
data already in --out that the current settings would not reproduce is refused.

    python experiments/membership_audit.py --out=experiments/results/membership_audit
    python experiments/membership_audit.py --out=/tmp/ma --only=non_private,dp_sgd_eps3 \\
        --extra=--config.model.pooling=mean
    python experiments/membership_audit.py --tiny --out=/tmp/ma_tiny   # tiny-bert, about a minute

--canary_repeats=R inserts each included canary R times. The privacy unit of
training is one row, so the canary is then a group of R rows and the DP claim
for it is group privacy: an (eps, delta)-DP run is (R eps, R e^((R-1) eps) delta)-DP
for a canary (the textbook group-privacy bound, looser than an accountant's
exact figure would be). The table reports that epsilon_R beside the run's epsilon
and tests the bound against it; R = 1 (the default) is the run's own claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from anadp import accounting  # noqa: E402
from anadp import audit_one_run as aor  # noqa: E402
from configs.tiny import FLAGS as TINY_MODEL_FLAGS  # noqa: E402
from configs.tuned import LEARNING_RATES  # noqa: E402
from experiments.cells import config_for_command, path_for_commands  # noqa: E402
from experiments.membership_data import build_audit_data, task_splits, write_audit_data  # noqa: E402
from experiments.membership_table import git_commit, markdown, write_tables  # noqa: E402
from experiments.runner import config_conflicts  # noqa: E402

DEFAULT_OUT = os.path.join("experiments", "results", "membership_audit")
DEFAULT_CONFIG = "configs/default.py"
# Guess counts tried for every row, cut at m (and m itself added): fixed before any
# score is seen, as the Bonferroni correction in best_lower_bound requires.
CANDIDATE_KS = (20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Apart from train.seed (0 in configs/base.py), so the bits are independent of training.
CANARY_SEED = 101
INCLUSION_SEED = 102
FPR = 0.01

# The tiny pipeline of the tests (configs/tiny.py), two steps.
TINY_FLAGS = (*TINY_MODEL_FLAGS, "--config.train.steps=2")
TINY_NUM_CANARIES = 20
TINY_TRAIN_ROWS = 300
DEFAULT_NUM_CANARIES = 1000


@dataclasses.dataclass(frozen=True)
class Row:
    """One training run of the plan."""

    name: str
    method: str
    epsilon: float | None = None  # None: non-private
    clipping: str = "elliptical"
    flags: tuple[str, ...] = ()

    def config_flags(self) -> list[str]:
        flags = [f"--config.privacy.method={self.method}"]
        if self.epsilon is not None:
            flags.append(f"--config.privacy.epsilon={self.epsilon:g}")
        if self.method == "anadp":
            flags.append(f"--config.privacy.clipping={self.clipping}")
        return flags + list(self.flags)


# The recipe the committed table ran with (configs/default.py at its commit: LoRA,
# BERT's [CLS] pooler, lr 1e-2), pinned so that the audit stays the same when the
# default moves. --extra flags come after these and override them in every row.
AUDITED_RECIPE = ("--config.model.finetune=lora", "--config.model.pooling=cls", "--config.train.learning_rate=0.01")
# Non-private LoRA learns with a smaller rate than the private default (as in grid rt_main).
_NON_PRIVATE = Row("non_private", "non_private",
                   flags=(f"--config.train.learning_rate={LEARNING_RATES[('lora', 'non_private')]:g}",))
PLAN = (
    _NON_PRIVATE,
    *(Row(f"dp_sgd_eps{e:g}", "dp_sgd", e) for e in (1.0, 3.0, 8.0)),
    *(Row(f"anadp_eps{e:g}", "anadp", e) for e in (1.0, 3.0, 8.0)),
    # The literal variant with sigma calibrated as if it were DP-SGD; its summary's
    # epsilon is the worst case that sigma really spends.
    Row("anadp_global_eps3", "anadp", 3.0, clipping="global"),
)
TINY_PLAN = (PLAN[0], PLAN[2])  # non_private, dp_sgd_eps3


# --- training ---------------------------------------------------------------------------


def launch_command(row: Row, out: str, args) -> list[str]:
    """`launch.py` for one row: the CSV task, the privacy randomness, tiny flags, the row's flags, then --extra.

    Paths are relative to the repository (launch.py runs there) when --out is inside
    it, so that the recorded commands and the table hold on any checkout.
    """
    shown = path_for_commands(out)
    data = [
        "--config.data.task=csv",
        f"--config.data.train_file={os.path.join(shown, 'train.csv')}",
        f"--config.data.dev_file={os.path.join(shown, 'dev.csv')}",
        "--config.data.text_column=text",
        "--config.data.label_column=label",
        f"--config.privacy.randomness={args.randomness}",
    ]
    tiny = list(TINY_FLAGS) if args.tiny else []
    return [sys.executable, "launch.py", f"--config={args.config}", f"--workdir={row_dir(shown, row)}",
            *data, *AUDITED_RECIPE, *tiny, *row.config_flags(), *args.extra]


def row_dir(out: str, row: Row) -> str:
    return os.path.join(out, "runs", row.name)


def read_summary(out: str, row: Row) -> dict | None:
    path = os.path.join(row_dir(out, row), "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def flags_text(command: list[str]) -> str:
    """The command without its interpreter, which may differ between machines running one audit."""
    return shlex.join(command[1:])


def train_row(row: Row, command: list[str], out: str) -> tuple[int, float]:
    """Runs the row's training to completion (resuming a checkpoint); (exit status, wall seconds)."""
    workdir = row_dir(out, row)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "command.txt"), "w", encoding="utf-8") as f:
        f.write(flags_text(command) + "\n")
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    return status, time.time() - start


def check_same_config(row: Row, command: list[str], summary: dict) -> None:
    """A finished row is reused only if it ran the config `command` runs, field by field
    (not flag by flag: a pinned flag may state what was then the default). The CSV
    paths are left out: they differ between checkouts, and write_audit_data has
    already refused other data in --out."""
    conflicts = config_conflicts(summary.get("config", {}), config_for_command(command),
                                 ignore=("data.train_file", "data.dev_file"))
    if conflicts:
        raise ValueError(f"row {row.name} finished with another config than now ({'; '.join(conflicts[:5])}); "
                         "use another --out or delete that row's folder")


def log_tail(out: str, row: Row, lines: int = 15) -> str:
    with open(os.path.join(row_dir(out, row), "log.txt"), encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


# --- scoring and the bound --------------------------------------------------------------


def canary_scores(workdir: str, canaries: list[tuple[str, int]]) -> np.ndarray:
    """Minus the loss of each canary's label under the trained model (log p(label | text))."""
    import scipy.special

    from anadp import inference

    model, params, tokenizer, labels = inference.load_run(workdir)
    max_length = inference.read_run_config(workdir)["data"]["max_length"]
    # The CSV's labels are the task's ids written as integers; the run names its classes by them.
    missing = sorted({y for _, y in canaries if str(y) not in labels})
    if missing:
        raise ValueError(f"{workdir}: canary labels {missing} are not among the run's classes {labels}")
    ids = np.array([labels.index(str(y)) for _, y in canaries])
    logits = inference.predict_logits(model, params, tokenizer, [t for t, _ in canaries], max_length=max_length)
    log_probs = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    return log_probs[np.arange(len(canaries)), ids]


def guess_counts(num_canaries: int, ks: list[int] | None) -> list[int]:
    """The k tried: the given ones, or CANDIDATE_KS up to m plus m itself (even, as top/bottom halves need)."""
    if ks:
        bad = [k for k in ks if k % 2 or not 2 <= k <= num_canaries]
        if bad:
            raise ValueError(f"--ks has {bad}: each k must be even and in [2, {num_canaries}] (the canaries)")
        return ks
    out = [k for k in CANDIDATE_KS if k <= num_canaries]
    largest = num_canaries - num_canaries % 2
    return out + [largest] if largest >= 2 and largest not in out else out


def group_privacy(epsilon: float, delta: float, group: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one row implies (g epsilon, g e^((g-1) epsilon) delta)-DP for g rows.

    A delta_g past 1 says nothing and is returned as 1 (also keeping exp from
    overflowing at the literal variant's epsilon of ~100).
    """
    if group < 1:
        raise ValueError(f"group={group} must be >= 1")
    if group == 1 or math.isinf(epsilon):
        return epsilon * group, delta
    log_delta = math.log(group * delta) + (group - 1) * epsilon if delta > 0 else -math.inf
    return group * epsilon, math.exp(min(0.0, log_delta))


def audit_row(row: Row, summary: dict, scores: np.ndarray, included: np.ndarray, *,
              ks: list[int], confidence: float, repeats: int) -> dict:
    """One line of the table: the run's claims and what the canaries' scores show."""
    m = scores.size
    private = summary["method"] != "non_private"
    if private:
        claim_eps, claim_delta = group_privacy(summary["epsilon"], summary["delta"], repeats)
    else:  # no claim: bound at the delta a private run on the same rows would have
        claim_eps, claim_delta = math.inf, accounting.default_delta(summary["num_train"])
    if 2 * m * claim_delta <= 1:
        bound, k = aor.best_lower_bound(scores, included, ks=ks, delta=claim_delta, confidence=confidence)
        correct = aor.top_bottom_correct(scores, included, k)
    else:  # the theorem's delta term is only monotone (and so invertible) for 2 m delta <= 1
        bound, k, correct = math.nan, None, None
    return {
        "row": row.name,
        "method": summary["method"],
        "clipping": summary.get("clipping") or "",
        "target_epsilon": summary.get("target_epsilon"),
        "reported_epsilon": summary["epsilon"],
        "dp_sgd_epsilon_same_sigma": summary.get("dp_sgd_epsilon_same_sigma"),
        "epsilon_realised_sequence_not_a_guarantee": summary.get("epsilon_realised_sequence_not_a_guarantee"),
        "canary_repeats": repeats,
        "canary_epsilon": claim_eps,
        "bound_delta": claim_delta,
        "noise_multiplier": summary.get("noise_multiplier"),
        "steps": summary["steps"],
        "num_train": summary["num_train"],
        "randomness": summary.get("randomness"),
        "num_canaries": m,
        "num_included": int(included.sum()),
        "guesses": k,
        "correct": correct,
        "epsilon_lower_bound": bound,
        # None where there is nothing to compare: no claim (non-private) or no bound.
        "bound_exceeds_claim": None if math.isnan(bound) or math.isinf(claim_eps) else bool(bound > claim_eps),
        "auc": aor.membership_auc(scores, included),
        "tpr_at_1pct_fpr": aor.tpr_at_fpr(scores, included, FPR),
        "dev_accuracy": summary["eval"].get("accuracy"),
        "wall_time_s": summary.get("nonprivate/wall_time_s"),
    }


# --- main -------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (relative to the current directory)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="launch.py's --config, relative to the repository")
    p.add_argument("--num_canaries", type=int, default=None,
                   help=f"m (default {DEFAULT_NUM_CANARIES}; --tiny: {TINY_NUM_CANARIES})")
    p.add_argument("--canary_length", type=int, default=8, help="words per canary")
    p.add_argument("--canary_repeats", type=int, default=1,
                   help="copies of each included canary; R > 1 makes the claim group privacy over R rows")
    p.add_argument("--canary_seed", type=int, default=CANARY_SEED)
    p.add_argument("--inclusion_seed", type=int, default=INCLUSION_SEED)
    p.add_argument("--train_rows", type=int, default=None,
                   help=f"the first N rows of the task's train split (default: all; --tiny: {TINY_TRAIN_ROWS})")
    p.add_argument("--randomness", choices=("seeded", "secure"), default="seeded",
                   help="privacy.randomness of every run (seeded: reproducible, paired like the grids)")
    p.add_argument("--only", default="", help="comma-separated row names to train (the table covers all finished)")
    p.add_argument("--extra", action="append", default=[],
                   help="a flag passed to every launch.py, e.g. --extra=--config.model.pooling=mean (repeatable)")
    p.add_argument("--ks", default="", help="comma-separated guess counts (default: 20, 50, 100, ... up to m, and m)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--tiny", action="store_true",
                   help=f"tests: tiny-bert, {TINY_NUM_CANARIES} canaries, {TINY_TRAIN_ROWS} rows, 2 steps, "
                        f"rows {', '.join(r.name for r in TINY_PLAN)}")
    p.add_argument("--dry_run", action="store_true", help="write the data and print the commands; train nothing")
    args = p.parse_args(argv)
    if args.num_canaries is None:
        args.num_canaries = TINY_NUM_CANARIES if args.tiny else DEFAULT_NUM_CANARIES
    if args.train_rows is None:
        args.train_rows = TINY_TRAIN_ROWS if args.tiny else 0
    bad_extra = [x for x in args.extra if not x.startswith("--")]
    if bad_extra:
        p.error(f"--extra={bad_extra[0]!r} is not a flag (write --extra=--config.group.field=value)")
    try:
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ks={args.ks!r} must be comma-separated integers")
    return args


def selected_rows(plan: tuple[Row, ...], only: str) -> list[Row]:
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {r.name for r in plan}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--only={only!r}: no row named {', '.join(unknown)} (rows: {', '.join(known)})")
    return [r for r in plan if not names or r.name in names]


def run_audit(args, argv: list[str]) -> int:
    out = os.path.abspath(args.out)
    plan = TINY_PLAN if args.tiny else PLAN
    rows = selected_rows(plan, args.only)
    ks = guess_counts(args.num_canaries, args.ks)
    train, dev, num_labels = task_splits()
    data = build_audit_data(train, dev, num_labels, num_canaries=args.num_canaries,
                            canary_length=args.canary_length, repeats=args.canary_repeats,
                            canary_seed=args.canary_seed, inclusion_seed=args.inclusion_seed,
                            train_rows=args.train_rows)
    write_audit_data(out, data)
    commands = {row.name: launch_command(row, out, args) for row in plan}

    failed = []
    # Every run trains before any is scored: scoring imports JAX here, which on an
    # accelerator would hold memory that the training subprocesses need.
    for row in rows:
        summary = read_summary(out, row)
        if summary is not None:
            check_same_config(row, commands[row.name], summary)
            print(f"{row.name}: finished, skipped")
            continue
        if args.dry_run:
            print(shlex.join(commands[row.name]))
            continue
        print(f"{row.name}: training ...", flush=True)
        status, seconds = train_row(row, commands[row.name], out)
        print(f"{row.name}: exit {status} after {seconds:.0f} s", flush=True)
        if status != 0:
            failed.append(row.name)
            print(log_tail(out, row), file=sys.stderr)
    if args.dry_run:
        return 0

    results = []
    for row in plan:
        summary = read_summary(out, row)
        if summary is None:
            continue
        scores = canary_scores(row_dir(out, row), data.canaries)
        with open(os.path.join(row_dir(out, row), "canary_scores.json"), "w", encoding="utf-8") as f:
            json.dump({"score": "log p(label | text) (minus the loss)", "scores": scores.tolist()}, f)
        results.append(audit_row(row, summary, scores, data.included, ks=ks,
                                 confidence=args.confidence, repeats=args.canary_repeats))
    header = {**{k: v for k, v in data.record.items() if k != "canaries"},
              "command": shlex.join(["python", "experiments/membership_audit.py", *argv]),
              "commit": git_commit(), "randomness": args.randomness, "ks": ks, "confidence": args.confidence}
    command_texts = {name: flags_text(cmd) for name, cmd in commands.items()}
    write_tables(out, results, command_texts, header)
    print(markdown(results, command_texts, header))
    if failed:
        print(f"error: rows {', '.join(failed)} failed; see their log.txt under {out}/runs", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return run_audit(args, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
