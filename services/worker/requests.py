"""RequestSpec (what services exchange) to the engine's RequestState."""

from __future__ import annotations

from services.common.messages import RequestSpec
from services.worker.engine import RequestState, SamplingParams


def engine_state(spec: RequestSpec) -> RequestState:
    """The engine's view of a request. Output tokens already delivered are kept, so a
    failover resumes at the next position with the same seed (recompute); a migrated
    request keeps its num_computed_tokens (its KV travelled with it)."""
    s = spec.sampling
    params = SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
    )
    return RequestState(
        request_id=spec.request_id,
        prompt_token_ids=spec.prompt_token_ids,
        output_token_ids=spec.output_token_ids,
        params=params,
        priority=spec.priority,
        num_computed_tokens=spec.num_computed_tokens,
        arrival_time=spec.arrival_time,
    )
