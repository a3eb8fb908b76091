"""What enters the engine: a new request (LLMEngine.add_request) or one that migrates in
(EngineMigration.import_request).

Checks the request against the model and the KV pool (an EngineInputError subclass
names what is wrong), fixes a seed for a sampled request that brought none, and numbers
requests in the order they entered (the scheduler's tie-break after arrival time).
"""

from __future__ import annotations

import dataclasses
import random

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import ModelConfig
from services.worker.engine.errors import (
    DuplicateRequestError,
    EmptyPromptError,
    InvalidRequestIdError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    PromptTooLongError,
)
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import Scheduler


class RequestIntake:
    def __init__(
        self,
        model_config: ModelConfig,
        max_model_len: int,
        scheduler: Scheduler,
        block_manager: BlockManager,
    ) -> None:
        self.vocab_size = model_config.vocab_size
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.num_numbered = 0  # requests numbered so far: the last seq_no handed out
        self._seed_rng = random.Random()  # seeds for sampled requests that bring none

    def check_new_id(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestIdError(f"request_id must be a non-empty str, got {request_id!r}")
        self.check_not_present(request_id)

    def check_not_present(self, request_id: str) -> None:
        if request_id in self.scheduler.requests:
            raise DuplicateRequestError(f"request {request_id!r} is already in the engine")

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """params, with a seed fixed now if the request samples and brought none (so its
        stream survives preemption and migration)."""
        if not isinstance(params, SamplingParams):
            raise InvalidSamplingParamsError(
                f"params must be SamplingParams, got {type(params).__name__}"
            )
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidSamplingParamsError(
                f"SamplingParams.stop_token_ids {bad} are outside the vocab"
            )
        if params.seed is None and not params.is_greedy:
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        return params

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        if not isinstance(prompt_token_ids, list | tuple):
            raise InvalidTokenError(
                f"prompt_token_ids must be a list of ints, got {type(prompt_token_ids).__name__}"
            )
        if not prompt_token_ids:
            raise EmptyPromptError("the prompt has no tokens")
        vocab_size = self.vocab_size
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
        pool_tokens = self.block_manager.num_total_blocks * self.block_manager.block_size
        if num_tokens > pool_tokens:
            raise PromptTooLongError(
                f"prompt has {num_tokens} tokens; the whole KV pool holds {pool_tokens}"
            )

    def check_priority(self, priority: int) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidSamplingParamsError(f"priority must be an int, got {priority!r}")

    def take_seq_no(self) -> int:
        self.num_numbered += 1
        return self.num_numbered
