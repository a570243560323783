"""launch.py flags for a tiny random BERT: the end-to-end tests' runs and the
membership audit's --tiny mode, so that the two smoke tests train the same model."""

FLAGS = (
    "--config.model.name=tiny-bert",
    "--config.data.max_length=32",
    "--config.train.expected_batch_size=32",
    "--config.train.physical_batch_size=16",
    "--config.train.microbatch_size=8",
    "--config.train.eval_batch_size=256",
    "--config.train.learning_rate=1e-3",
)
