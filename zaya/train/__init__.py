"""Training and fine-tuning for ZAYA models: config, data, the balancing controller, the loop.

    from zaya.train import load_config, train
    result = train(load_config("recipes/train-tiny.toml"))

See docs/training.md for the config format and the command line (``zaya train``, torchrun).
"""

from __future__ import annotations

from zaya.train.balance import BalanceController, load_stats
from zaya.train.config import TrainConfig, from_dict, load_config
from zaya.train.data import DataError
from zaya.train.loop import Result, TrainingError, train

__all__ = ["BalanceController", "DataError", "Result", "TrainConfig", "TrainingError", "from_dict", "load_config",
           "load_stats", "train"]
