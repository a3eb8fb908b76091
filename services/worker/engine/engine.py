"""LLMEngine: the worker's engine. One step is schedule -> execute -> update.

    LLMEngine.from_config(config)        a torch engine: model, KV pool, TorchExecutor
    LLMEngine.simulated(config, profile)  accounting only (the simulator): no tensors,
                                          a CostModelExecutor; same scheduler and books

The engine owns its parts and hands each one what it needs; none of them knows the engine:

    intake         checks what enters (new requests, migrated ones) and numbers them
    scheduler      waiting queue, running batch, preemption, over the block manager
    executor       runs a scheduled batch (TorchExecutor or CostModelExecutor)
    migration      Llumnix hooks: engine.migration.read_kv_blocks(...), ... (migration.py)
    layer_ranges   KunServe hooks: engine.layer_ranges.drop_layers(...), join_group(...), ...
                   (layer_ranges.py)
    pipeline       KunServe micro-batches: engine.pipeline.schedule_micro_batch(...), ...
                   (pipeline.py)

Threads. The engine is not thread-safe. One thread steps it (the worker's AsyncEngine
runs it on a thread of its own) and every other call runs on that thread between two
steps (AsyncEngine.run), with these exceptions, which other threads make while it steps:
- engine.migration.read_kv_blocks / write_kv_blocks: the worker's live migration copies
  KV beside the steps (migration.py says which blocks that is safe for, and when not);
- reads of what changes only when layers are dropped or restored: config, model_config,
  tokenizer, max_model_len, kv_block_nbytes, kv_cache.block_shape / dtypes;
- add_preemption_callback (a list append); the callback itself runs on the stepping
  thread, inside step().
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.common.tokenizer import ByteTokenizer, Tokenizer
from services.worker.engine import native
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig, ModelConfig
from services.worker.engine.cost_model import (
    CostModelExecutor,
    CostModelProfile,
    batch_features,
    get_profile,
)
from services.worker.engine.errors import BlockIntegrityError, EngineStateError
from services.worker.engine.executor import Executor, TorchExecutor
from services.worker.engine.held_layers import HeldLayers, SimulatedLayers, TorchLayers
from services.worker.engine.intake import RequestIntake
from services.worker.engine.kv_cache import KVCache, kv_block_nbytes
from services.worker.engine.layer_ranges import LayerRanges
from services.worker.engine.loader import load_model_source
from services.worker.engine.migration import EngineMigration
from services.worker.engine.model import LlamaModel
from services.worker.engine.outputs import EngineStats, RequestOutput, RequestView, StepInfo
from services.worker.engine.pipeline import Pipeline
from services.worker.engine.request import Request, RequestStatus
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.staging import StepUploader, device_kind, is_cuda
from services.worker.engine.weights import build_stage_weights, hf_names

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        executor: Executor,
        held: HeldLayers,
        *,
        num_blocks: int,
        max_model_len: int,
        dtype: str,
        kernels: str,
        model: LlamaModel | None = None,
        kv_cache: KVCache | None = None,
    ) -> None:
        """Wires the parts that from_config (a torch engine) or simulated (accounting
        only) built: build an engine with one of those."""
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.kernels = kernels  # "native" or "torch"; "none" when simulated (nothing runs)
        # "cpu" or "cuda:<GPU name>": migrations move requests between equal ones only.
        self.device_kind = device_kind(config.device) if model is not None else "none"
        self.model = model  # None when simulated
        self.kv_cache = kv_cache  # None when simulated
        self.executor = executor
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            config, self.block_manager, max_model_len, model_config.eos_token_ids
        )
        self.intake = RequestIntake(model_config, max_model_len, self.scheduler, self.block_manager)
        self.migration = EngineMigration(
            self.scheduler, self.block_manager, kv_cache, self.intake, model_config.eos_token_ids
        )
        self.layer_ranges = LayerRanges(
            model_config,
            dtype,
            self.block_manager,
            self.scheduler,
            held,
            memory_nbytes=config.memory_capacity_bytes if config.num_kv_blocks is None else None,
        )
        self.last_step = StepInfo()
        self._pending_outputs: list[RequestOutput] = []  # shared with the pipeline: no rebinding
        self.pipeline = Pipeline(self.scheduler, executor, self._pending_outputs)

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> LLMEngine:
        """A torch engine: loads the model, picks its kernels (EngineConfig.kernels),
        and allocates the KV pool in what memory_capacity_bytes leaves after the weights."""
        config = config or EngineConfig()
        source = load_model_source(config.model)
        model_config = source.config
        kernels = _resolve_kernels(config, model_config)
        num_layers = model_config.num_layers
        tensors = source.weights.load(hf_names(model_config, 0, num_layers))
        weights = build_stage_weights(
            model_config, tensors, 0, num_layers, config.dtype, config.device
        )
        del tensors
        model = LlamaModel(model_config, weights, kernels)
        max_model_len = _max_model_len(config, model_config)
        num_blocks = _initial_num_blocks(
            config,
            model.nbytes(),
            kv_block_nbytes(model_config, num_layers, config.block_size, config.dtype),
        )
        kv_cache = KVCache(
            model_config, 0, num_layers, num_blocks, config.block_size, config.dtype, config.device
        )
        return cls(
            config,
            model_config,
            source.tokenizer,
            TorchExecutor(
                model, kv_cache, StepUploader(config.device) if is_cuda(config.device) else None
            ),
            TorchLayers(model, kv_cache, source.weights, config.dtype, config.device),
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            dtype=config.dtype,
            kernels=kernels,
            model=model,
            kv_cache=kv_cache,
        )

    @classmethod
    def simulated(
        cls, config: EngineConfig | None = None, profile: str | CostModelProfile = "tiny-cpu"
    ) -> LLMEngine:
        """An accounting-only engine (no tensors) for the simulator: the model's shape,
        dtype and step times come from the cost-model `profile`; weight and KV bytes are
        computed from the shape; steps return deterministic fake tokens (never EOS)."""
        config = config or EngineConfig()
        profile = get_profile(profile)
        model_config, dtype = profile.model, profile.dtype
        executor = CostModelExecutor(profile, model_config.vocab_size, model_config.eos_token_ids)
        held = SimulatedLayers(model_config, dtype, executor.cost_model)
        num_layers = model_config.num_layers
        max_model_len = _max_model_len(config, model_config)
        num_blocks = _initial_num_blocks(
            config,
            held.weight_nbytes(0, num_layers),
            kv_block_nbytes(model_config, num_layers, config.block_size, dtype),
        )
        return cls(
            config,
            model_config,
            ByteTokenizer(),
            executor,
            held,
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            dtype=dtype,
            kernels="none",
        )

    # ---- sizes ------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        ids = self.model_config.eos_token_ids
        return ids[0] if ids else None

    @property
    def layer_start(self) -> int:
        return self.layer_ranges.layer_start

    @property
    def layer_end(self) -> int:
        return self.layer_ranges.layer_end

    @property
    def weight_nbytes(self) -> int:
        """Bytes of weights held (real tensor sizes; analytic for a simulated engine)."""
        return self.layer_ranges.weight_nbytes

    @property
    def kv_block_nbytes(self) -> int:
        """Bytes of one KV block over the layers this engine holds."""
        return self.layer_ranges.kv_block_nbytes

    # ---- requests ---------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queues a request. Raises an EngineInputError subclass for bad input."""
        intake = self.intake
        intake.check_new_id(request_id)
        params = intake.check_params(params)
        intake.check_prompt(prompt_token_ids)
        intake.check_priority(priority)
        request = Request(
            request_id,
            prompt_token_ids,
            params,
            priority,
            time.time() if arrival_time is None else arrival_time,
            intake.take_seq_no(),
        )
        self.scheduler.add_waiting(request)

    def abort_request(self, request_id: str) -> bool:
        """Stops a request and frees its blocks; the next step() reports it with
        finish_reason "abort". False if the request is unknown (or already finished)."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return False
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._pending_outputs.append(
            RequestOutput(request_id, [], request.num_output_tokens, True, "abort")
        )
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests) or bool(self._pending_outputs)

    def step(self) -> list[RequestOutput]:
        """Runs one iteration over the whole batch; returns every request's new tokens."""
        if not self.layer_ranges.steps_alone:
            raise EngineStateError(
                f"the engine holds layers [{self.layer_start}, {self.layer_end}) only; "
                "run it as a pipeline stage or restore_layers() first"
            )
        outputs = self._pending_outputs.copy()
        self._pending_outputs.clear()
        batch = self.scheduler.schedule()
        self.last_step = StepInfo(preempted_request_ids=list(batch.preempted_request_ids))
        if batch.is_empty:
            return outputs
        result = self.executor.execute(batch)
        outputs += self.scheduler.update_from_output(batch, result.sampled_token_ids)
        multi = [len(r.token_ids) for r in batch.requests if len(r.token_ids) > 1]
        self.last_step = StepInfo(
            num_scheduled_requests=len(batch.requests),
            num_batched_tokens=batch.num_batched_tokens,
            num_prefill_tokens=sum(multi),
            num_decode_requests=len(batch.requests) - len(multi),
            preempted_request_ids=list(batch.preempted_request_ids),
            elapsed_s=result.elapsed_s,
            started_request_ids=[
                r.request_id for r in batch.requests if r.num_computed_tokens == 0
            ],
            features=batch_features(batch),
        )
        return outputs

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Runs prompts to completion (blocking); one merged RequestOutput per prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{self.intake.num_numbered + 1}-{i}" for i in range(len(prompts))]
        try:
            for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
                self.add_request(request_id, prompt, p)
        except Exception:
            for request_id in ids:
                self.abort_request(request_id)
            self._pending_outputs[:] = [o for o in self._pending_outputs if o.request_id not in ids]
            raise
        merged = {request_id: RequestOutput(request_id, [], 0, False, None) for request_id in ids}
        while any(not m.finished for m in merged.values()):
            for out in self.step():
                if out.request_id in merged:
                    merged[out.request_id].new_token_ids += out.new_token_ids
                    merged[out.request_id].finished = out.finished
                    merged[out.request_id].finish_reason = out.finish_reason
        return [merged[request_id] for request_id in ids]

    # ---- load and introspection -------------------------------------------------------

    def stats(self) -> EngineStats:
        scheduler, block_manager = self.scheduler, self.block_manager
        head = scheduler.waiting[0] if scheduler.waiting else None
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_total_blocks=block_manager.num_total_blocks,
            num_free_blocks=block_manager.num_free_blocks,
            num_used_blocks=block_manager.num_used_blocks,
            num_hol_blocks=block_manager.num_blocks_for(head.num_tokens) if head else 0,
            num_running_high_priority=sum(1 for r in scheduler.running if r.priority > 0),
            num_preemptions=scheduler.num_preemptions,
            num_reserved_blocks=block_manager.num_reserved_blocks,
            num_suspended=sum(1 for r in scheduler.running if r.status is RequestStatus.SUSPENDED),
        )

    def running_requests(self) -> list[RequestView]:
        return [
            RequestView(
                request_id=r.request_id,
                num_tokens=r.num_tokens,
                num_blocks=len(self.block_manager.block_ids(r.request_id)),
                priority=r.priority,
                num_output_tokens=r.num_output_tokens,
                is_suspended=r.status is RequestStatus.SUSPENDED,
            )
            for r in self.scheduler.running
        ]

    def request_status(self, request_id: str) -> RequestStatus | None:
        request = self.scheduler.requests.get(request_id)
        return request.status if request else None

    def add_preemption_callback(self, callback: Callable[[str], None]) -> None:
        """callback(request_id) runs when a request is preempted (its KV is dropped), so a
        migration of that request can abort. last_step.preempted_request_ids says it too."""
        self.scheduler.preemption_callbacks.append(callback)

    def check_integrity(self) -> None:
        """Raises BlockIntegrityError if the block books or the request tables disagree."""
        self.block_manager.check_integrity()
        tables = self.block_manager.block_tables
        for request in self.scheduler.waiting:
            if request.request_id in tables:
                raise BlockIntegrityError(f"waiting request {request.request_id!r} holds blocks")
        for request in self.scheduler.running:
            needed = self.block_manager.num_blocks_for(request.num_computed_tokens)
            if len(tables.get(request.request_id, [])) < needed:
                raise BlockIntegrityError(
                    f"running request {request.request_id!r} has fewer blocks than its KV"
                )
        owners = {r.request_id for r in self.scheduler.running}
        if set(tables) - owners:
            raise BlockIntegrityError(
                f"block tables of unknown requests: {sorted(set(tables) - owners)}"
            )


def _resolve_kernels(config: EngineConfig, model_config: ModelConfig) -> str:
    """config.kernels resolved to "native" or "torch"."""
    if config.kernels == "torch":
        return "torch"
    why_not = native.unavailable(model_config, config.dtype, config.device)
    if why_not is None:
        return "native"
    if config.kernels == "native":
        raise ValueError(f"kernels 'native' are unavailable: {why_not}")
    log.info("kernels: torch (the native kernels are unavailable: %s)", why_not)
    return "torch"


def _max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    model_limit = model_config.max_context_len
    if config.max_model_len is not None and config.max_model_len > model_limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} exceeds the model's context of {model_limit}"
        )
    return config.max_model_len or model_limit


def _initial_num_blocks(config: EngineConfig, weight_nbytes: int, block_nbytes: int) -> int:
    """config.num_kv_blocks if the weights leave room for them, else as many blocks of
    block_nbytes as memory_capacity_bytes holds beside weight_nbytes of weights."""
    capacity = config.memory_capacity_bytes
    if config.num_kv_blocks is not None:
        if weight_nbytes + config.num_kv_blocks * block_nbytes > capacity:
            raise ValueError(
                f"memory_capacity_bytes={capacity} cannot hold {weight_nbytes} bytes of weights "
                f"plus num_kv_blocks={config.num_kv_blocks} blocks of {block_nbytes} bytes"
            )
        return config.num_kv_blocks
    num_blocks = (capacity - weight_nbytes) // block_nbytes
    if num_blocks < 1:
        raise ValueError(
            f"memory_capacity_bytes={capacity} leaves no room for a KV block "
            f"({block_nbytes} bytes) after {weight_nbytes} bytes of weights"
        )
    return num_blocks
