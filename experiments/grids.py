"""The grids of fine-tuning runs (issue #6): what each one runs, as data.

A grid is a list of templates (config file, {dotted field: value}) and seeds;
each template runs once per seed (train.seed). experiments/cells.py turns a grid
into cells (names and launch.py commands); experiments/grid.py runs them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from configs.tuned import LEARNING_RATES, PROFILE_BEST

RT = "configs/default.py"  # MiniLM-L6, LoRA, Rotten Tomatoes
SST2 = "configs/sst2.py"
EPSILONS = (1.0, 3.0, 8.0)
SEEDS = (0, 1, 2)
PAIRED_SEEDS = (0, 1, 2, 3, 4)

Template = tuple[str, dict[str, Any]]

# The recipe every grid was written against: configs/base.py's LoRA, [CLS] pooler and
# lr 1e-2, the defaults of every committed cell. Each cell's command states them
# (before its template, which overrides them), so that a later change of the configs'
# defaults leaves what a grid runs, and the name of each cell, as they were.
PINNED = {"model.finetune": "lora", "model.pooling": "cls", "train.learning_rate": 1e-2}


@dataclasses.dataclass(frozen=True)
class Grid:
    description: str
    templates: list[Template]
    seeds: tuple[int, ...] = SEEDS


def main_templates(config: str, finetune: str, epsilons=EPSILONS) -> list[Template]:
    """Non-private once (no epsilon), then DP-SGD and ANADP at every epsilon."""

    def fields(method, **extra):
        lr = LEARNING_RATES.get((finetune, method))
        return {"model.finetune": finetune, "privacy.method": method, **extra,
                **({"train.learning_rate": lr} if lr else {})}

    out = [(config, fields("non_private"))]
    for method in ("dp_sgd", "anadp"):
        out += [(config, fields(method, **{"privacy.epsilon": e})) for e in epsilons]
    return out


def dp_sgd_baselines(config: str, epsilons=(3.0,)) -> list[Template]:
    """DP-SGD baselines, so that a grid's collect can pair its ANADP cells on its own."""
    return [(config, {"model.finetune": "lora", "privacy.method": "dp_sgd", "privacy.epsilon": e})
            for e in epsilons]


def anadp_product(config: str, **fields) -> list[Template]:
    """ANADP cells, LoRA: the product over the values of each `privacy.<field>`."""
    keys = list(fields)
    return [
        (config, {"model.finetune": "lora", "privacy.method": "anadp",
                  **{f"privacy.{k}": v for k, v in zip(keys, values)}})
        for values in itertools.product(*(fields[k] for k in keys))
    ]


def recipe_changes(config: str, changes: list[dict[str, Any]], method: str = "dp_sgd",
                   epsilon: float = 3.0) -> list[Template]:
    """DP-SGD (LoRA, one epsilon) from today's recipe, one change per cell (issue #20's search)."""
    base = {"model.finetune": "lora", "privacy.method": method}
    if method != "non_private":
        base["privacy.epsilon"] = epsilon
    return [(config, {**base, **change}) for change in changes]


# One factor at a time from configs/default.py (LoRA, C 1, constant lr 1e-2, Adam,
# 3 epochs of expected batch 256), most promising first, so that a grid cut short
# has run the levers the DP fine-tuning literature ranks highest.
RECIPE_STEP1 = [
    {"train.schedule": "linear"},
    {"privacy.l2_norm_clip": 0.1},
    {"train.expected_batch_size": 1024},
    {"train.schedule": "linear", "train.learning_rate": 2e-2},
    {"train.epochs": 6.0},
    {"model.finetune": "full", "train.learning_rate": 1e-3},
    {"train.learning_rate": 5e-3},
    {"model.finetune": "bias"},
]


# From mean pooling: the head alone (the private linear probe), then one change at a time.
RECIPE_STEP2 = [
    {"model.finetune": "head"},
    {"model.head_init": "zeros"},
    {"train.expected_batch_size": 1024},
    {"model.finetune": "full", "train.learning_rate": 1e-3},
    {"train.epochs": 6.0},
    {"privacy.l2_norm_clip": 0.1},
]

MEAN_POOLING = {"model.pooling": "mean"}
# The non-private reference of the recipe search, at non-private LoRA's learning rate.
MEAN_POOLING_NON_PRIVATE = {**MEAN_POOLING, "train.learning_rate": LEARNING_RATES[("lora", "non_private")]}

# rt_recipe_mean's best seed-0 cell (79.72): mean pooling, every parameter trained at
# private full fine-tuning's learning rate. Its eps sweep sits beside the private
# linear probe (head only) and non-private full fine-tuning with the same pooling.
MEAN_FULL = {**MEAN_POOLING, "model.finetune": "full", "train.learning_rate": LEARNING_RATES[("full", "dp_sgd")]}
MEAN_HEAD = {**MEAN_POOLING, "model.finetune": "head"}
MEAN_FULL_NON_PRIVATE = {**MEAN_POOLING, "model.finetune": "full",
                         "train.learning_rate": LEARNING_RATES[("full", "non_private")]}


# One change at a time from MEAN_FULL (C 1, clip, constant lr, 3 epochs of expected
# batch 256), the clipping levers first: the DP fine-tuning literature clips every
# example (C 0.1, Li et al.) or normalises it (Bu et al.), and decays the lr linearly.
FROZEN_EMBEDDINGS = {"model.finetune": "frozen_embeddings"}
FULL_LEVERS = [
    {"privacy.clip_fn": "automatic"},
    {"privacy.l2_norm_clip": 0.1},
    {"train.schedule": "linear"},
    {"train.epochs": 6.0},
    FROZEN_EMBEDDINGS,
]


def epsilon_sweep(config: str, change: dict[str, Any], epsilons=EPSILONS) -> list[Template]:
    return [t for e in epsilons for t in recipe_changes(config, [change], epsilon=e)]


GRIDS: dict[str, Grid] = {
    "rt_main": Grid(
        "Rotten Tomatoes, LoRA: non-private, DP-SGD and ANADP at epsilon 1, 3, 8",
        main_templates(RT, "lora"),
    ),
    "sst2_main": Grid(
        "SST-2, LoRA: non-private, DP-SGD and ANADP at epsilon 1, 3, 8; full fine-tuning at epsilon 3",
        main_templates(SST2, "lora") + main_templates(SST2, "full", epsilons=(3.0,)),
    ),
    "rt_sweep": Grid(
        "Rotten Tomatoes, LoRA, epsilon 3: ANADP importance x gamma x rho (+ DP-SGD baseline)",
        dp_sgd_baselines(RT)
        + anadp_product(RT, epsilon=[3.0], importance=["elementwise", "group_taylor", "signal"],
                        gamma=[-0.5, 0.0, 0.5, 1.0], rho=[2.0, 4.0]),
    ),
    "rt_literal": Grid(
        "Rotten Tomatoes, LoRA: the literal ANADP variant (privacy.clipping=global) calibrated to the same "
        "target epsilon, hence the same noise multiplier, as DP-SGD (+ DP-SGD baselines); its summary reports "
        "the epsilon it really spends and dp_sgd_epsilon_same_sigma",
        dp_sgd_baselines(RT, EPSILONS) + anadp_product(RT, epsilon=list(EPSILONS), clipping=["global"]),
    ),
    "rt_profile_paired": Grid(
        "Rotten Tomatoes, LoRA: private_profile at its best rt_profile setting against DP-SGD at epsilon "
        "1, 3, 8, 5 paired seeds",
        dp_sgd_baselines(RT, EPSILONS) + anadp_product(RT, epsilon=list(EPSILONS), **PROFILE_BEST),
        PAIRED_SEEDS,
    ),
    "sst2_profile_paired": Grid(
        "SST-2, LoRA: private_profile at its best rt_profile setting against DP-SGD at epsilon 1, 3, 8, "
        "5 paired seeds",
        dp_sgd_baselines(SST2, EPSILONS) + anadp_product(SST2, epsilon=list(EPSILONS), **PROFILE_BEST),
        PAIRED_SEEDS,
    ),
    "rt_recipe": Grid(
        "Rotten Tomatoes, epsilon 3, seed 0: DP-SGD with one change at a time from the default recipe",
        recipe_changes(RT, RECIPE_STEP1),
        (0,),
    ),
    "rt_recipe_mean": Grid(
        "Rotten Tomatoes, epsilon 3, seed 0: the recipe search from mean pooling (the pooling "
        "all-MiniLM-L6-v2 was trained with), one change at a time; non-private and head-only for reference",
        recipe_changes(RT, [MEAN_POOLING])
        + recipe_changes(RT, [MEAN_POOLING_NON_PRIVATE], method="non_private")
        + recipe_changes(RT, [{**MEAN_POOLING, **change} for change in RECIPE_STEP2]),
        (0,),
    ),
    "sst2_recipe": Grid(
        "SST-2 (1 epoch), epsilon 3, seed 0: DP-SGD and non-private with mean pooling, against sst2_main's cls runs",
        recipe_changes(SST2, [MEAN_POOLING])
        + recipe_changes(SST2, [MEAN_POOLING_NON_PRIVATE], method="non_private"),
        (0,),
    ),
    "rt_recipe_full": Grid(
        "Rotten Tomatoes, mean pooling, full fine-tuning: DP-SGD at epsilon 1, 3, 8 against the private "
        "head-only baseline at the same epsilons and non-private full fine-tuning, 3 seeds",
        epsilon_sweep(RT, MEAN_FULL) + epsilon_sweep(RT, MEAN_HEAD)
        + recipe_changes(RT, [MEAN_FULL_NON_PRIVATE], method="non_private"),
    ),
    "rt_recipe_full_lr": Grid(
        "Rotten Tomatoes, mean pooling, full fine-tuning, DP-SGD at epsilon 3, seed 0: learning rates "
        "around 1e-3",
        recipe_changes(RT, [{**MEAN_FULL, "train.learning_rate": lr} for lr in (5e-4, 2e-3)]),
        (0,),
    ),
    "rt_recipe_full_levers": Grid(
        "Rotten Tomatoes, mean pooling, full fine-tuning, DP-SGD at epsilon 3, seed 0: one change at a time "
        "from the recipe (per-example normalisation, C 0.1, linear decay, 6 epochs, frozen embeddings)",
        recipe_changes(RT, [{**MEAN_FULL, **change} for change in FULL_LEVERS]),
        (0,),
    ),
    "rt_recipe_frozen_embeddings": Grid(
        "Rotten Tomatoes, mean pooling, full fine-tuning with the embedding layer frozen, DP-SGD at epsilon "
        "1, 3, 8, 3 seeds (its epsilon 3 cells are rt_recipe_full_levers')",
        epsilon_sweep(RT, {**MEAN_FULL, **FROZEN_EMBEDDINGS}),
    ),
    "sst2_recipe_full": Grid(
        "SST-2, 3 epochs of expected batch 1024 (197 steps), mean pooling: DP-SGD full fine-tuning at "
        "epsilon 1, 3, 8 against the private head-only baseline and non-private full fine-tuning, 3 seeds "
        "(about 1.6 hours a full fine-tuning cell alone on the 2-core CPU: a GPU's grid)",
        epsilon_sweep(SST2, {**MEAN_FULL, "train.epochs": 3.0})
        + epsilon_sweep(SST2, {**MEAN_HEAD, "train.epochs": 3.0})
        + recipe_changes(SST2, [{**MEAN_FULL_NON_PRIVATE, "train.epochs": 3.0}], method="non_private"),
    ),
    "rt_strong": Grid(
        "Rotten Tomatoes, mean pooling, full fine-tuning, lr 1e-3 (the best private setting of the recipe "
        "search): ANADP as the paper describes it (elliptical, elementwise, gamma 0.5, rho 2) against "
        "DP-SGD at epsilon 1, 3, 8, 3 paired seeds (the DP-SGD cells are rt_recipe_full's)",
        epsilon_sweep(RT, MEAN_FULL)
        + [t for e in EPSILONS for t in recipe_changes(RT, [MEAN_FULL], method="anadp", epsilon=e)],
    ),
    "rt_strong_lora": Grid(
        "Rotten Tomatoes, mean pooling, LoRA (the other fine-tuning mode of rt_strong) at epsilon 3: "
        "the paper's ANADP against DP-SGD, 3 paired seeds",
        recipe_changes(RT, [MEAN_POOLING]) + recipe_changes(RT, [MEAN_POOLING], method="anadp"),
    ),
    "rt_strong_lora_sweep": Grid(
        "Rotten Tomatoes, mean pooling, LoRA, epsilon 3, seed 0: ANADP gamma x rho around the paper's "
        "(gamma 0.5, rho 2: rt_strong_lora's cell)",
        [(config, {**fields, **MEAN_POOLING})
         for config, fields in anadp_product(RT, epsilon=[3.0], gamma=[-0.5, 0.5, 1.0], rho=[2.0, 4.0])],
        (0,),
    ),
    "rt_profile": Grid(
        "Rotten Tomatoes, LoRA, epsilon 3: ANADP with the private_profile importance, gamma x rho "
        "(+ DP-SGD baseline)",
        dp_sgd_baselines(RT)
        + anadp_product(RT, epsilon=[3.0], importance=["private_profile"], gamma=[-1.0, -0.5, 0.5, 1.0],
                        rho=[1.5, 2.0, 4.0]),
    ),
}
