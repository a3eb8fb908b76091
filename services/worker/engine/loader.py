"""Resolves EngineConfig.model ("tiny" or a checkpoint directory) to its parts."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.tokenizer import (
    TINY_MODEL,
    ByteTokenizer,
    Tokenizer,
    checkpoint_dir,
    load_tokenizer,
)
from services.worker.engine.config import ModelConfig
from services.worker.engine.tiny import TINY_MODEL_CONFIG
from services.worker.engine.weights import CheckpointWeightSource, TinyWeightSource, WeightSource


@dataclass
class ModelSource:
    config: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer


def load_model_source(model: str) -> ModelSource:
    if model == TINY_MODEL:
        return ModelSource(TINY_MODEL_CONFIG, TinyWeightSource(), ByteTokenizer())
    path = checkpoint_dir(model)
    config = ModelConfig.from_checkpoint_dir(path)
    return ModelSource(config, CheckpointWeightSource(path), load_tokenizer(model))


def load_model_config(model: str) -> ModelConfig:
    """Only the shape (no weights): what an accounting-only engine needs."""
    if model == TINY_MODEL:
        return TINY_MODEL_CONFIG
    return ModelConfig.from_checkpoint_dir(model)
