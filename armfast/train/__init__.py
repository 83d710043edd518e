"""ARM training: config, data order, checkpoints, schedule, DDP plumbing and the loop."""
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .trainer import TrainResult, Trainer, segmentation_loss, train

__all__ = ["TrainConfig", "train", "Trainer", "TrainResult", "segmentation_loss", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints"]
