"""Typed recipe sections, one small module per concern."""

from .evaluate import EvaluateConfig
from .ingest import IngestConfig
from .model import ModelConfig, TinyModelConfig
from .recipe import Recipe, is_remote, load_recipe, parse_recipe
from .serve import ServeConfig
from .train import TrainConfig

__all__ = [
    "EvaluateConfig",
    "IngestConfig",
    "ModelConfig",
    "Recipe",
    "ServeConfig",
    "TinyModelConfig",
    "TrainConfig",
    "is_remote",
    "load_recipe",
    "parse_recipe",
]
