"""The offline default: MiniLM-L6 + LoRA on Rotten Tomatoes, ANADP at epsilon 3."""

from configs import base


def get_config():
    return base.get_config()
