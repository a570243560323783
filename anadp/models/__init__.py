"""BERT / RoBERTa encoders in Flax linen, HF checkpoint loading, LoRA.

Public surface::

    model, params = from_pretrained(name_or_path, num_labels, lora=None, seed=0,
                                    pooling="cls", head_init="normal", dtype="float32")
    model, params = from_config(hf_config, num_labels, lora=None, seed=0,
                                pooling="cls", head_init="normal", dtype="float32")
    # dtype: "float32" | "bfloat16" (COMPUTE_DTYPES), what the model computes in;
    # the parameters are float32 either way
    pooling = resolve_pooling(name_or_path, "cls" | "mean" | "auto")  # "cls" | "mean"
    logits = model.apply({"params": params}, input_ids, attention_mask,
                         token_type_ids=None, deterministic=True)
    hidden = model.apply({"params": params}, input_ids, attention_mask,
                         deterministic=True, method=model.encode)
    tok = tokenizer(name_or_path)
    trainable, frozen = partition(params, "full" | "lora" | "bias" | "head")
    params = combine(trainable, frozen)
    merged = merge_lora(params)        # apply with model.clone(lora=None)
    layer, matrix = layer_and_matrix(path)
"""
from .config import (
    MEAN_POOLED_BERT_TYPE,
    ModelConfig,
    check_max_length,
    minilm_l6_config,
    roberta_base_config,
    tiny_bert_config,
)
from .hf_checkpoint import LoadReport, convert_checkpoint, read_safetensors
from .loading import (
    POOLING_CHOICES,
    SHORT_NAMES,
    checkpoint_pooling,
    from_config,
    from_pretrained,
    minilm_path,
    resolve_path,
    resolve_pooling,
    tokenizer,
)
from .lora import (
    FINETUNE_MODES,
    LAYER_DENSE_MODULES,
    LoraConfig,
    combine,
    count_params,
    flatten_params,
    layer_and_matrix,
    merge_lora,
    partition,
    unflatten_params,
)
from .modeling import COMPUTE_DTYPES, HEAD_INITS, POOLINGS, EncoderClassifier, compute_dtype

__all__ = [
    "COMPUTE_DTYPES",
    "EncoderClassifier",
    "FINETUNE_MODES",
    "HEAD_INITS",
    "LAYER_DENSE_MODULES",
    "LoadReport",
    "LoraConfig",
    "MEAN_POOLED_BERT_TYPE",
    "ModelConfig",
    "POOLINGS",
    "POOLING_CHOICES",
    "SHORT_NAMES",
    "check_max_length",
    "checkpoint_pooling",
    "combine",
    "compute_dtype",
    "convert_checkpoint",
    "count_params",
    "flatten_params",
    "from_config",
    "from_pretrained",
    "layer_and_matrix",
    "merge_lora",
    "minilm_l6_config",
    "minilm_path",
    "partition",
    "read_safetensors",
    "resolve_path",
    "resolve_pooling",
    "roberta_base_config",
    "tiny_bert_config",
    "tokenizer",
    "unflatten_params",
]
