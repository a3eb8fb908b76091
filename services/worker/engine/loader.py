"""Resolves EngineConfig.model ("tiny" or a checkpoint directory) to its parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.worker.engine.config import ModelConfig
from services.worker.engine.tiny import TINY_MODEL_CONFIG
from services.worker.engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
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
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"model {model!r}: no tokenizer.json in that directory")
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    return ModelSource(
        config, CheckpointWeightSource(path), HFTokenizer(tokenizer_file, config.bos_token_id, eos)
    )


def load_model_config(model: str) -> ModelConfig:
    """Only the shape (no weights): what an accounting-only engine needs."""
    if model == TINY:
        return TINY_MODEL_CONFIG
    return ModelConfig.from_checkpoint_dir(model)
