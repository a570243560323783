"""Export a trained run as a Hugging Face folder: `python -m anadp.export --workdir=W --out=D`.

D holds what `transformers` needs and nothing of this repository's code:

    config.json          the base model's HF config, with the classifier's
                         architectures, num_labels, id2label / label2id
    model.safetensors    the weights in HF's names and layouts (LoRA merged)
    tokenizer files      the run's tokenizer (save_pretrained), model_max_length
                         set to the run's data.max_length
    README.md            a model card: the privacy guarantee and the dev metrics
    modeling_anadp.py    mean-pooled BERT only: its PyTorch class (trust_remote_code)

BERT with its standard head (pooling=cls) exports as BertForSequenceClassification
and RoBERTa as RobertaForSequenceClassification. A mean-pooled BERT computes a
function no standard class computes, so it ships its own class
(anadp/export_code/modeling_anadp.py) under config.json's `auto_map`.

Nothing secret is written: the weights come from `inference.load_run`, which
reads only the trainable params of the checkpoint, never its noise key, sampler
seed, optimiser state or ledger (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping

import numpy as np

from anadp import checkpoint, inference, models
from anadp.models.hf_checkpoint import hf_key

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_code", "modeling_anadp.py")
MEAN_POOLED_CLASS = "AnadpBertMeanForSequenceClassification"
MEAN_POOLED_AUTO_MAP = {
    "AutoConfig": "modeling_anadp.AnadpBertMeanConfig",
    "AutoModelForSequenceClassification": f"modeling_anadp.{MEAN_POOLED_CLASS}",
}
# Fields of the base config that describe the base checkpoint, not the exported model.
_BASE_ONLY_FIELDS = ("_name_or_path", "architectures", "auto_map", "transformers_version", "id2label",
                     "label2id", "num_labels", "problem_type")
METHOD_NAMES = {"non_private": "non-private fine-tuning", "dp_sgd": "DP-SGD", "anadp": "ANADP"}


# --- weights and config -----------------------------------------------------------


def architecture(model) -> str:
    """The class the export loads as: HF's own for the standard heads, ours for mean pooling."""
    if model.config.model_type == "roberta":
        return "RobertaForSequenceClassification"
    return MEAN_POOLED_CLASS if model.pooling == "mean" else "BertForSequenceClassification"


def hf_state_dict(model, params: Mapping) -> dict[str, np.ndarray]:
    """Our params under HF's names and layouts: the inverse of the loader's mapping
    (`hf_checkpoint.hf_key`). Dense kernels go from (in, out) to torch's (out, in); the
    encoder's tensors take the base-model prefix ("bert." / "roberta."), the head
    ("classifier.*") none, as in HF's *ForSequenceClassification."""
    tensors = {}
    for path, value in models.flatten_params(params).items():
        mapped = hf_key(path)
        if mapped is None:
            raise ValueError(f"{'/'.join(path)} has no HF name: merge LoRA before exporting (models.merge_lora)")
        key, transpose = mapped
        if path[0] != "classifier":
            key = f"{model.config.model_type}.{key}"
        value = np.asarray(value, np.float32)
        tensors[key] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def base_hf_config(name: str) -> dict:
    """The HF config dict of the checkpoint a run started from."""
    if name == "tiny-bert":
        return models.tiny_bert_config()
    with open(os.path.join(models.resolve_path(name), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def export_hf_config(model, base: Mapping, labels: list[str]) -> dict:
    """config.json of the export: the base config, with the encoder fields the
    model was built from (so that both sides agree) and the classifier's labels."""
    config = {k: v for k, v in base.items() if k not in _BASE_ONLY_FIELDS}
    config.update(dataclasses.asdict(model.config))
    config.update(
        architectures=[architecture(model)],
        num_labels=len(labels),
        id2label={str(i): name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="single_label_classification",
    )
    if architecture(model) == MEAN_POOLED_CLASS:
        config.update(model_type=models.MEAN_POOLED_BERT_TYPE, auto_map=dict(MEAN_POOLED_AUTO_MAP))
    return config


# --- the model card ----------------------------------------------------------------


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _clipping_text(privacy: Mapping, clipping: str | None) -> str:
    bound = f"per-example gradient L2 norm bounded by C = {_fmt(float(privacy['l2_norm_clip']))}"
    if privacy.get("clip_fn") == "automatic":
        bound += f", by normalisation C h / (norm(h) + {_fmt(float(privacy['automatic_r']))}) (clip_fn=automatic)"
    else:
        bound += ", h min(1, C / norm(h)) (clip_fn=clip)"
    if clipping == "elliptical":
        bound += "; elliptical (each group whitened by its noise scale, then clipped)"
    elif clipping == "global":
        bound += "; one global clip before uneven noise (the literal variant)"
    return bound


def _metrics_table(eval_splits: Mapping) -> list[str]:
    names = sorted({k for metrics in eval_splits.values() for k in metrics})
    lines = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split, metrics in eval_splits.items():
        lines.append(f"| {split} | " + " | ".join(_fmt(metrics.get(k, "")) for k in names) + " |")
    return lines


def _last_logged(workdir: str, step: int) -> dict | None:
    """The last metrics.jsonl record at or before `step` (an unfinished run's latest evaluation)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if r.get("step", 0) <= step and "eval" in r]
    return records[-1] if records else None


def _privacy_lines(config: Mapping, summary: Mapping) -> list[str]:
    p = config["privacy"]
    if summary["method"] == "non_private":
        return ["This model is **not differentially private** (privacy.method=non_private): it is a "
                "non-private reference, and its weights may reveal its training data."]
    lines = [
        "| | |", "|---|---|",
        f"| epsilon | {summary['epsilon']:.4f} |",
        f"| delta | {summary['delta']:.3g} |",
        f"| accountant | {p['accountant'].upper()} (dp_accounting), Poisson subsampling |",
        f"| method | {METHOD_NAMES.get(summary['method'], summary['method'])} (privacy.method={summary['method']}) |",
        f"| clipping | {_clipping_text(p, summary.get('clipping'))} |",
        f"| noise multiplier | {_fmt(summary['noise_multiplier'])} |",
        f"| N (training rows) | {summary['num_train']} |",
        f"| expected batch size, sampling rate | {_fmt(summary['expected_batch_size'])}, "
        f"q = {summary['sampling_rate']:.4g} |",
        f"| steps | {summary['steps']} |",
        f"| randomness | {summary['randomness']} |",
        "",
        "The guarantee is (epsilon, delta)-differential privacy for one training row (add or remove "
        "one row) of everything the run released, this model included. N is assumed public. Not "
        "covered: hyperparameters chosen on the same data's dev split, the base model's own training "
        "data (docs/privacy.md of the ANADP repository).",
    ]
    if "epsilon_realised_sequence_not_a_guarantee" in summary:
        lines.append("This run used the literal variant (global clipping, uneven noise): its epsilon above "
                     "is the data-independent worst case.")
    if summary["randomness"] == "seeded":
        lines.append("**randomness=seeded**: the noise and the batches were derived from the public train.seed, "
                     "so the guarantee holds only against someone who does not have the run's config.")
    return lines


def _unfinished_lines(workdir: str, config: Mapping, step: int) -> list[str]:
    t = config["train"]
    planned = f"{t['steps']} steps" if t["steps"] > 0 else f"{t['epochs']} epochs"
    lines = [f"**Unfinished run**: exported from the checkpoint at step {step} ({planned} planned). The run wrote "
             "no summary.json, so no final accounting is stated here."]
    last = _last_logged(workdir, step)
    if last is None:
        return lines + ["No evaluation was logged before that step."]
    lines.append(f"Last logged evaluation (step {last['step']}" + (
        f", epsilon so far {last['epsilon']:.4f}" if "epsilon" in last else "") + "):")
    lines += ["", *_metrics_table(last["eval"])]
    if last["step"] < step:
        lines.append(f"The weights are from step {step}: their epsilon is larger than the one logged at step "
                     f"{last['step']}.")
    return lines


def model_card(workdir: str, config: Mapping, summary: Mapping | None, labels: list[str], model,
               step: int) -> str:
    """README.md of the export: what the model is, its privacy guarantee, its dev metrics."""
    m, d = config["model"], config["data"]
    method = config["privacy"]["method"]
    finetune = m["finetune"]
    if finetune == "lora":
        finetune += f" (rank {m['lora_rank']}, alpha {_fmt(float(m['lora_alpha']))}, on {m['lora_targets']}; merged)"
    arch = architecture(model)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-classification",
        "tags: [differential-privacy, anadp]", "---", "",
        f"# {d['task']}: {METHOD_NAMES.get(method, method)} fine-tuning of {m['name']}", "",
        f"A {arch} fine-tuned with the ANADP codebase (JAX/Flax) and exported by `python -m anadp.export`.", "",
        f"- base model: `{m['name']}` ({model.config.model_type}); fine-tuning: {finetune}",
        f"- pooling: {model.pooling}; labels (class id order): {', '.join(labels)}",
        f"- inputs truncated to data.max_length = {d['max_length']} tokens, as in training "
        "(the tokenizer's model_max_length)",
        f"- checkpoint step: {step}", "",
        "## Privacy", "",
    ]
    if summary is None:
        lines += _unfinished_lines(workdir, config, step)
    else:
        lines += _privacy_lines(config, summary)
        lines += ["", "## Dev metrics", "", *_metrics_table(summary["eval_splits"])]
    remote = ", trust_remote_code=True" if arch == MEAN_POOLED_CLASS else ""
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{remote})',
        f'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder"{remote}).eval()',
        'logits = model(**tokenizer(["a fine film"], truncation=True, return_tensors="pt")).logits',
        "```",
    ]
    if remote:
        lines += ["", "Mean pooling has no standard transformers class: the model is `modeling_anadp.py` in this "
                      "folder (BertModel without pooler, masked mean of the last hidden states, dropout, linear), "
                      "loaded only with `trust_remote_code=True` (without it transformers refuses the folder; "
                      "the tokenizer is BERT's own); read the file before you trust it."]
    return "\n".join(lines) + "\n"


# --- the export ---------------------------------------------------------------------


def _check_output_folder(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out={out!r} exists and is not an empty folder; choose a new one")


def export_run(workdir: str, out: str, allow_unfinished: bool = False) -> list[str]:
    """Writes the HF folder `out` for the run in `workdir`; returns the names of its files.

    Refuses a run without summary.json (unfinished, so no final epsilon) unless
    `allow_unfinished`. The folder is built beside `out` and renamed into place,
    so a failed export leaves nothing half written.
    """
    config = inference.read_run_config(workdir)
    summary = inference.read_summary(workdir)
    if summary is None and not allow_unfinished:
        raise ValueError(f"{workdir!r} has no summary.json: the run has not finished, so it has no final "
                         "epsilon to state; pass --allow_unfinished to export its latest checkpoint anyway")
    _check_output_folder(out)
    step = checkpoint.latest_checkpoint_step(workdir)
    model, params, tokenizer, labels = inference.load_run(workdir, merge=True, step=step)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        _write_folder(tmp, workdir, config, summary, model, params, tokenizer, labels, step)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(os.listdir(out))


def _write_folder(folder, workdir, config, summary, model, params, tokenizer, labels, step) -> None:
    from safetensors.numpy import save_file

    hf_config = export_hf_config(model, base_hf_config(config["model"]["name"]), labels)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    # "pt": transformers' PyTorch loader reads files whose metadata names its framework.
    save_file(hf_state_dict(model, params), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if architecture(model) == MEAN_POOLED_CLASS:
        shutil.copy(MODELING_FILE, os.path.join(folder, "modeling_anadp.py"))
    # Default truncation then cuts inputs where training did.
    tokenizer.model_max_length = int(config["data"]["max_length"])
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(workdir, config, summary, labels, model, step))
    # mkdtemp (and safetensors) make owner-only files; the export is for sharing.
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anadp.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--allow_unfinished", action="store_true",
                        help="export the latest checkpoint of a run without summary.json")
    args = parser.parse_args(argv)

    def action() -> str:
        files = export_run(args.workdir, args.out, args.allow_unfinished)
        return f"exported {args.workdir} to {args.out}: {', '.join(files)}"

    return inference.run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
