"""Resolves EngineConfig.model ("tiny" or a checkpoint directory) to its parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from services.worker.engine.config import ModelConfig
from services.worker.engine.tiny import TINY_MODEL_CONFIG
from services.worker.engine.weights import CheckpointWeightSource, TinyWeightSource, WeightSource

TINY = "tiny"


@dataclass
class ModelSource:
    config: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer


def load_model_source(model: str) -> ModelSource:
    if model == TINY:
        return ModelSource(TINY_MODEL_CONFIG, TinyWeightSource(), ByteTokenizer())
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model {model!r} is neither 'tiny' nor a checkpoint directory")
    config = ModelConfig.from_checkpoint_dir(path)
    return ModelSource(config, CheckpointWeightSource(path), load_tokenizer(model))


def load_model_config(model: str) -> ModelConfig:
    """Only the shape (no weights): what an accounting-only engine needs."""
    if model == TINY:
        return TINY_MODEL_CONFIG
    return ModelConfig.from_checkpoint_dir(model)
