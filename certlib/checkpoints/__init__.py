"""Checkpoints: the model card and its file formats (``checkpoint``), weights read without running
pickled code (``weights``), and models imported from elsewhere (``importing``)."""

from certlib.checkpoints.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint

__all__ = ["ModelCard", "load_checkpoint", "read_card", "save_checkpoint"]
