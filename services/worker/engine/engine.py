"""LLMEngine: the worker's engine. One step is schedule -> execute -> update.

Public surface (all used by the worker's servicer, the llumlet and the simulator):
requests (add / abort / step), load stats, migration hooks (export, read/write KV
blocks, reserve, suspend, remove, import) and KunServe hooks (drop / restore layers).
The engine is plain torch and single-threaded: callers serialise calls.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable

import torch

from services.common.tokenizer import ByteTokenizer, Tokenizer
from services.worker.engine import native
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import DTYPE_NBYTES, EngineConfig
from services.worker.engine.cost_model import (
    CostModel,
    CostModelExecutor,
    CostModelProfile,
    get_profile,
)
from services.worker.engine.errors import (
    BlockIntegrityError,
    DuplicateRequestError,
    EmptyPromptError,
    EngineStateError,
    InvalidRequestIdError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    PromptTooLongError,
)
from services.worker.engine.executor import Executor, TorchExecutor
from services.worker.engine.kv_cache import KVCache, kv_block_nbytes
from services.worker.engine.layers import LayerRangeMixin
from services.worker.engine.loader import load_model_source
from services.worker.engine.migration import MigrationMixin
from services.worker.engine.model import LlamaModel
from services.worker.engine.outputs import EngineStats, RequestOutput, RequestView, StepInfo
from services.worker.engine.request import Request, RequestStatus
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.weights import build_stage_weights, hf_names

log = logging.getLogger(__name__)

EXECUTORS = ("torch", "cost_model")


class LLMEngine(LayerRangeMixin, MigrationMixin):
    def __init__(
        self,
        config: EngineConfig | None = None,
        executor: str = "torch",
        profile: str | CostModelProfile | None = None,
    ) -> None:
        """executor="torch" loads the model and allocates the KV pool for real;
        executor="cost_model" builds an accounting-only engine (no tensors) whose model
        shape, dtype and step times come from `profile` (default: "tiny-cpu")."""
        self.config = config = config or EngineConfig()
        if executor not in EXECUTORS:
            raise ValueError(f"executor {executor!r} is not one of {EXECUTORS}")
        self.is_simulated = executor == "cost_model"
        self.model: LlamaModel | None = None
        self.kv_cache: KVCache | None = None
        self.tokenizer: Tokenizer
        if self.is_simulated:
            self.profile: CostModelProfile | None = get_profile(profile or "tiny-cpu")
            self.model_config = self.profile.model
            self.dtype = self.profile.dtype
            self.kernels = "none"  # nothing runs
            self.tokenizer = ByteTokenizer()
            self.weight_source = None
        else:
            if profile is None and config.model == "tiny":
                profile = "tiny-cpu"  # step_time estimates; other models bring their own
            self.profile = get_profile(profile) if profile is not None else None
            source = load_model_source(config.model)
            self.model_config, self.tokenizer, self.weight_source = (
                source.config,
                source.tokenizer,
                source.weights,
            )
            self.dtype = config.dtype
            self.kernels = self._kernels()
            num_layers = self.model_config.num_layers
            tensors = source.weights.load(hf_names(self.model_config, 0, num_layers))
            weights = build_stage_weights(
                self.model_config, tensors, 0, num_layers, self.dtype, config.device
            )
            del tensors
            self.model = LlamaModel(self.model_config, weights, self.kernels == "native")
        self.layer_start, self.layer_end = 0, self.model_config.num_layers
        self.host_weights: dict[str, torch.Tensor] = {}  # dropped weights kept for restore

        model_limit = self.model_config.max_context_len
        if config.max_model_len is not None and config.max_model_len > model_limit:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's context of {model_limit}"
            )
        self.max_model_len = config.max_model_len or model_limit

        num_blocks = self._initial_num_blocks()
        self.num_blocks_complete = num_blocks  # pool size with every layer held (restore target)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            config, self.block_manager, self.max_model_len, self.model_config.eos_token_ids
        )
        self.executor: Executor
        if self.is_simulated:
            assert self.profile is not None
            self.executor = CostModelExecutor(
                self.profile, self.model_config.vocab_size, self.model_config.eos_token_ids
            )
        else:
            assert self.model is not None
            self.kv_cache = KVCache(
                self.model_config,
                0,
                self.model_config.num_layers,
                num_blocks,
                config.block_size,
                self.dtype,
                config.device,
            )
            step_time_model = CostModel(self.profile) if self.profile is not None else None
            self.executor = TorchExecutor(self.model, self.kv_cache, step_time_model, self.kernels)

        self.last_step = StepInfo()
        self._pending_outputs: list[RequestOutput] = []
        self._next_seq_no = 0
        self._seed_rng = random.Random()  # seeds for sampled requests that bring none

    def _kernels(self) -> str:
        """config.kernels resolved to "native" or "torch"."""
        requested = self.config.kernels
        if requested == "torch":
            return "torch"
        why_not = native.unavailable(self.model_config, self.dtype, self.config.device)
        if why_not is None:
            return "native"
        if requested == "native":
            raise ValueError(f"kernels 'native' are unavailable: {why_not}")
        log.info("kernels: torch (the native kernels are unavailable: %s)", why_not)
        return "torch"

    # ---- sizes ------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        ids = self.model_config.eos_token_ids
        return ids[0] if ids else None

    @property
    def weight_nbytes(self) -> int:
        """Bytes of weights held (real tensor sizes; analytic for a simulated engine)."""
        if self.model is not None:
            return self.model.nbytes()
        return (
            self.model_config.num_params(self.layer_start, self.layer_end)
            * DTYPE_NBYTES[self.dtype]
        )

    @property
    def kv_block_nbytes(self) -> int:
        """Bytes of one KV block over the layers this engine holds."""
        return kv_block_nbytes(
            self.model_config, self.layer_end - self.layer_start, self.config.block_size, self.dtype
        )

    def _initial_num_blocks(self) -> int:
        config, weights, block = self.config, self.weight_nbytes, self.kv_block_nbytes
        if config.num_kv_blocks is not None:
            if weights + config.num_kv_blocks * block > config.memory_capacity_bytes:
                raise ValueError(
                    f"memory_capacity_bytes={config.memory_capacity_bytes} cannot hold {weights} bytes of weights "
                    f"plus num_kv_blocks={config.num_kv_blocks} blocks of {block} bytes"
                )
            return config.num_kv_blocks
        num_blocks = (config.memory_capacity_bytes - weights) // block
        if num_blocks < 1:
            raise ValueError(
                f"memory_capacity_bytes={config.memory_capacity_bytes} leaves no room for a KV block "
                f"({block} bytes) after {weights} bytes of weights"
            )
        return num_blocks

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
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestIdError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.scheduler.requests:
            raise DuplicateRequestError(f"request {request_id!r} is already in the engine")
        params = self._check_params(params)
        self._check_prompt(prompt_token_ids)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidSamplingParamsError(f"priority must be an int, got {priority!r}")
        request = Request(
            request_id,
            prompt_token_ids,
            params,
            priority,
            time.time() if arrival_time is None else arrival_time,
            self._take_seq_no(),
        )
        self.scheduler.add_waiting(request)

    def _check_params(self, params: SamplingParams) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise InvalidSamplingParamsError(
                f"params must be SamplingParams, got {type(params).__name__}"
            )
        bad = [t for t in params.stop_token_ids if t >= self.model_config.vocab_size]
        if bad:
            raise InvalidSamplingParamsError(
                f"SamplingParams.stop_token_ids {bad} are outside the vocab"
            )
        if params.seed is None and not params.is_greedy:
            # Fix the seed now so the stream survives preemption and migration.
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        return params

    def _check_prompt(self, prompt_token_ids: list[int]) -> None:
        if not isinstance(prompt_token_ids, list | tuple):
            raise InvalidTokenError(
                f"prompt_token_ids must be a list of ints, got {type(prompt_token_ids).__name__}"
            )
        if not prompt_token_ids:
            raise EmptyPromptError("the prompt has no tokens")
        vocab_size = self.model_config.vocab_size
        for token_id in prompt_token_ids:
            if (
                isinstance(token_id, bool)
                or not isinstance(token_id, int)
                or not 0 <= token_id < vocab_size
            ):
                raise InvalidTokenError(f"token id {token_id!r} is not an int in [0, {vocab_size})")
        num_tokens = len(prompt_token_ids)
        if num_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {num_tokens} tokens; the model context is {self.max_model_len}"
            )
        pool_tokens = self.block_manager.num_total_blocks * self.config.block_size
        if num_tokens > pool_tokens:
            raise PromptTooLongError(
                f"prompt has {num_tokens} tokens; the whole KV pool holds {pool_tokens}"
            )

    def _take_seq_no(self) -> int:
        self._next_seq_no += 1
        return self._next_seq_no

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
        if not self.is_simulated and not self.is_complete:
            raise EngineStateError(
                f"the engine holds layers [{self.layer_start}, {self.layer_end}) only; "
                "run it as a pipeline stage or restore_layers() first"
            )
        outputs, self._pending_outputs = self._pending_outputs, []
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
        )
        return outputs

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Runs prompts to completion (blocking); one merged RequestOutput per prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{self._next_seq_no + 1}-{i}" for i in range(len(prompts))]
        try:
            for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
                self.add_request(request_id, prompt, p)
        except Exception:
            for request_id in ids:
                self.abort_request(request_id)
            self._pending_outputs = [o for o in self._pending_outputs if o.request_id not in ids]
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
