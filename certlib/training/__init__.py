"""Training base classifiers under a family's noise (standard, or stability training of Li et
al. 2019): the configuration and its papers' defaults (``config``), the loop (``train``), the
step as one CUDA graph on GPUs (``step``) and the batches it reads (``batches``)."""

from certlib.training.config import TrainConfig
from certlib.training.train import train_model

__all__ = ["TrainConfig", "train_model"]
