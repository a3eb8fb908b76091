"""The worker's engine: a paged-KV Llama engine with continuous batching (plain torch).

See docs/engine.md for a walk-through of one request's lifecycle.
"""

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig, ModelConfig, RopeConfig
from services.worker.engine.cost_model import (
    BUILTIN_PROFILES,
    CostModel,
    CostModelExecutor,
    CostModelProfile,
    get_profile,
)
from services.worker.engine.engine import LLMEngine
from services.worker.engine.errors import (
    BlockIntegrityError,
    DuplicateRequestError,
    EmptyPromptError,
    EngineInputError,
    EngineStateError,
    GroupCapacityError,
    InvalidBlocksError,
    InvalidLayerRangeError,
    InvalidMicroBatchError,
    InvalidRequestIdError,
    InvalidRequestStateError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    KernelArgumentError,
    NoFreeBlocksError,
    PromptTooLongError,
    UnknownRequestError,
)
from services.worker.engine.executor import Executor, ExecutorOutput, TorchExecutor
from services.worker.engine.layer_ranges import LayerChange, LayerRanges
from services.worker.engine.micro_batching import MicroBatchCost, MicroBatchFormation
from services.worker.engine.migration import EngineMigration
from services.worker.engine.outputs import EngineStats, RequestOutput, RequestView, StepInfo
from services.worker.engine.pipeline import GroupPool, Pipeline, plan_group_pool
from services.worker.engine.request import RequestState, RequestStatus
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "BUILTIN_PROFILES",
    "BlockIntegrityError",
    "BlockManager",
    "CostModel",
    "CostModelExecutor",
    "CostModelProfile",
    "DuplicateRequestError",
    "EmptyPromptError",
    "EngineConfig",
    "EngineInputError",
    "EngineMigration",
    "EngineStateError",
    "EngineStats",
    "Executor",
    "ExecutorOutput",
    "GroupCapacityError",
    "GroupPool",
    "InvalidBlocksError",
    "InvalidLayerRangeError",
    "InvalidMicroBatchError",
    "InvalidRequestIdError",
    "InvalidRequestStateError",
    "InvalidSamplingParamsError",
    "InvalidTokenError",
    "KernelArgumentError",
    "LLMEngine",
    "LayerChange",
    "LayerRanges",
    "MicroBatchCost",
    "MicroBatchFormation",
    "ModelConfig",
    "NoFreeBlocksError",
    "Pipeline",
    "PromptTooLongError",
    "RequestOutput",
    "RequestState",
    "RequestStatus",
    "RequestView",
    "RopeConfig",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "StepInfo",
    "TorchExecutor",
    "UnknownRequestError",
    "get_profile",
    "plan_group_pool",
]
