"""GLUE SST-2 from the local GLUE directory (../shared/data/glue by default)."""

from configs import base


def get_config():
    config = base.get_config()
    config.data.task = "sst2"
    config.train.expected_batch_size = 1024
    config.train.physical_batch_size = 128
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    return config
