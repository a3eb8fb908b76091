"""The steady load of `llmesh bench chaos`: C streaming clients, each sending one
request after another through a live gateway, and what became of every request.

Every request is one of a fixed pool of (prompt, sampling) specs whose tokens an
in-process engine computed undisturbed first (greedy and seeded sampling: the same
tokens alone, preempted, migrated, pipelined or recomputed after a failover). Outcome:

    exact       it finished ("length") with exactly the undisturbed tokens
    resumed     its gateway died, the client resumed the stream on the other gateway
                (the SDK's `resume_stream`) and the tokens are exact
    resubmitted its gateway died and the resume found it on no worker (never placed,
                or its worker died too): the SDK sent it again with its seed and
                skipped the tokens the client had (gateway/client_resubmit.py), exact
    failed:S    it failed with status S, and its gateway had died (not resumed)
    violation   anything else: wrong or missing tokens, a gap or repeat in the stream,
                a failure while its gateway lived, a stream past its deadline
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

from bench._chaos_mesh import NUM_GATEWAYS, ChaosMesh
from gateway.client import AsyncClient, GatewayError, Resubmission, build_request

REQUEST_DEADLINE_S = 120.0  # a stream still open after this is a hang
MAX_RESUMES = 4  # resumes of one request (its new gateway may die too)
NUM_SPECS = 12


@dataclass(frozen=True)
class Spec:
    prompt: tuple[int, ...]
    sampling: dict


@dataclass
class RequestRecord:
    request_id: str
    spec_index: int
    gateway: int
    started: float
    ended: float | None = None
    tokens: list[int] = field(default_factory=list)
    instances: set[str] = field(default_factory=set)
    finish_reason: str | None = None
    outcome: str = "running"
    detail: str = ""
    was_resubmitted: bool = False  # a resume found it nowhere: the SDK sent it again

    def was_running_at(self, t: float) -> bool:
        return self.started <= t and (self.ended is None or t <= self.ended)


def make_specs(seed: int) -> list[Spec]:
    """Prompts of 4-60 tokens, 200-700 new ones (no EOS stop), half greedy, half seeded."""
    rng = random.Random(f"chaos-specs-{seed}")
    specs = []
    for i in range(NUM_SPECS):
        sampling = {"max_tokens": rng.randrange(200, 700), "ignore_eos": True, "seed": 500 + i}
        if i % 2:
            sampling.update(temperature=0.8, top_p=0.95)
        specs.append(Spec(tuple(rng.randrange(256) for _ in range(rng.randrange(4, 60))), sampling))
    return specs


def reference_tokens(specs: list[Spec]) -> list[list[int]]:
    """Every spec on one in-process engine, undisturbed (loaded like the workers', one
    torch thread like theirs: more only spin against the mesh on a small host)."""
    import torch

    from services.common.config import load_config
    from services.worker.engine import EngineConfig, LLMEngine, SamplingParams

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine.from_config(load_config(EngineConfig, "ENGINE", {"model": "tiny"}))
        tokens: dict[str, list[int]] = {}
        for i, spec in enumerate(specs):
            engine.add_request(f"ref-{i}", list(spec.prompt), SamplingParams(**spec.sampling))
            tokens[f"ref-{i}"] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
    finally:
        torch.set_num_threads(num_threads)
    return [tokens[f"ref-{i}"] for i in range(len(specs))]


class Load:
    """The clients; `records` holds every request they sent, in order."""

    def __init__(self, mesh: ChaosMesh, specs, expected, num_clients: int, seed: int) -> None:
        self.mesh = mesh
        self.specs = specs
        self.expected = expected
        self.num_clients = num_clients
        self.seed = seed
        self.records: list[RequestRecord] = []
        self._clients: dict[tuple[int, int], AsyncClient] = {}
        self._stop = asyncio.Event()
        self._next_gateway = itertools.count()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(c)) for c in range(self.num_clients)]

    async def stop(self) -> None:
        """Let each client finish its request (each has its deadline), then close."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        for client in self._clients.values():
            await client.close()

    def by_id(self) -> dict[str, RequestRecord]:
        return {r.request_id: r for r in self.records}

    def _client_for(self, gateway: int) -> AsyncClient:
        """One client per gateway incarnation: a fresh channel to a restarted gateway
        (an old one may sit in reconnect backoff)."""
        key = (gateway, self.mesh.gateway_epoch[gateway])
        if key not in self._clients:
            # The SDK's default retries (UNAVAILABLE before the first chunk), as users run it.
            self._clients[key] = AsyncClient(
                self.mesh.gateway_address(gateway), timeout_s=REQUEST_DEADLINE_S
            )
        return self._clients[key]

    def _pick_gateway(self) -> int | None:
        """Round robin over the gateways that are up (a load balancer's health check)."""
        for _ in range(NUM_GATEWAYS):
            g = next(self._next_gateway) % NUM_GATEWAYS
            if self.mesh.gateway_up[g]:
                return g
        return None

    async def _client(self, c: int) -> None:
        rng = random.Random(f"chaos-client-{self.seed}-{c}")
        for n in itertools.count():
            if self._stop.is_set():
                return
            g = self._pick_gateway()
            if g is None:
                await asyncio.sleep(0.05)
                continue
            spec_index = rng.randrange(len(self.specs))
            record = RequestRecord(f"chaos-{self.seed}-{c}-{n}", spec_index, g, time.monotonic())
            self.records.append(record)
            await self._run(record)
            record.ended = time.monotonic()

    async def _run(self, record: RequestRecord) -> None:
        spec = self.specs[record.spec_index]
        g = record.gateway
        epoch = self.mesh.gateway_epoch[g]
        stream = self._client_for(g).generate_stream(
            prompt_token_ids=list(spec.prompt), request_id=record.request_id, **spec.sampling
        )
        try:
            await self._consume(record, stream)
        except _StreamGap as exc:
            record.outcome, record.detail = "violation", str(exc)
            return
        except GatewayError as exc:
            if self.mesh.gateway_epoch[g] == epoch:
                record.outcome = "violation"
                record.detail = f"failed with {exc.code.name} while its gateway lived: {exc}"
                return
            if not await self._resume(record, g):
                record.outcome = f"failed:{exc.code.name}"
                record.detail += "its gateway died; not resumed"
                return
            if record.outcome.startswith("failed"):
                return
        self._judge(record)

    async def _resume(self, record: RequestRecord, dead: int) -> bool:
        """Resume on another gateway (gateway failover), again if that one dies too;
        False if not resumed (no gateway up). A resume that finds the request nowhere
        (it was never placed, or its worker died with its gateway) re-submits it: the
        SDK's re-submission, given the request as first sent and the tokens the client
        has, which it skips and checks."""
        spec = self.specs[record.spec_index]
        for _attempt in range(MAX_RESUMES):
            other = next(
                (g for g in range(NUM_GATEWAYS) if g != dead and self.mesh.gateway_up[g]), None
            )
            if other is None:
                return False
            client = self._client_for(other)
            epoch = self.mesh.gateway_epoch[other]
            record.detail += f"resumed on gateway {other} at token {len(record.tokens)}; "
            original = build_request(
                prompt_token_ids=list(spec.prompt), request_id=record.request_id, **spec.sampling
            )
            resubmission = Resubmission(original, record.tokens)
            try:
                stream = client.resume_stream(
                    record.request_id, len(record.tokens), resubmission=resubmission
                )
                await self._consume(record, stream)
            except _StreamGap as exc:
                record.outcome = "violation"
                record.detail += f"the resumed stream failed: {exc}"
                return True
            except GatewayError as exc:
                if self.mesh.gateway_epoch[other] == epoch:
                    record.outcome = "violation"
                    record.detail += f"the resumed stream failed while its gateway lived: {exc}"
                    return True
                dead = other  # that gateway died too: resume on the next
                record.was_resubmitted |= resubmission.count > 0
                continue
            record.was_resubmitted |= resubmission.count > 0
            record.outcome = "resubmitted" if record.was_resubmitted else "resumed"
            if record.was_resubmitted:
                record.detail += "found nowhere: re-submitted; "
            return True
        return False

    async def _consume(self, record: RequestRecord, stream) -> None:
        async for chunk in stream:
            if chunk.first_token_index != len(record.tokens):
                raise _StreamGap(
                    f"a chunk starts at token {chunk.first_token_index} after {len(record.tokens)}"
                )
            record.tokens.extend(chunk.token_ids)
            if chunk.token_ids:
                record.instances.add(chunk.instance_id)
            record.finish_reason = chunk.finish_reason

    def _judge(self, record: RequestRecord) -> None:
        if record.outcome == "violation":
            return
        expected = self.expected[record.spec_index]
        if record.finish_reason != "length" or record.tokens != expected:
            record.outcome = "violation"
            record.detail += (
                f"; finish {record.finish_reason}, {len(record.tokens)} tokens "
                f"(expected {len(expected)}), first difference at "
                f"{_first_difference(record.tokens, expected)}"
            )
        elif record.outcome not in ("resumed", "resubmitted"):
            record.outcome = "exact"


class _StreamGap(Exception):
    """A chunk did not start where the previous one ended (a gap or a repeat)."""


def _first_difference(got: list[int], want: list[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
