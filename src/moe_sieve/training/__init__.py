"""Fine-tuning (recipe step 3) on transformers' Trainer: one GPU, DDP or FSDP."""

from .config import TrainConfig
from .run import TrainResult, train
from .trainer import NonFiniteLossError, SieveTrainer

__all__ = ["NonFiniteLossError", "SieveTrainer", "TrainConfig", "TrainResult", "train"]
