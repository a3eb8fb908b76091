"""The data-plane half of `llmesh bench kunserve_mechanism`: one-way latency of the
pipeline's activation transfers between two stages, idle and while a KV exchange
runs between the same two members, and the exchange's throughput.

    this process (stage 0)                          child process (stage 1)
    micro-batch k: [meta, hidden] every interval    StageRunner-like receives, posted
      --- ACTIVATION class, pp/<key>/s1/<k> ----->  ahead; arrival time of each
      with exchange.activation_to(stage 1)
    KVExchange.send of every running request's     KVExchange.receive, written into
      slices of stage 1's layers (a drop's round)  its pool at the request's blocks
      --- KV class, kvx/<key>/<request>/0-1 ------>

The activation is what PipelineDriver sends: the encoded micro-batch (a decode step of
num_seqs requests with their block tables) and its hidden states (num_seqs, hidden)
in the model's dtype. The KV side is the real KVExchange (the pause around each
activation included), in rounds of num_requests transfers of one request's KV over
half the layers each; rounds follow each other until the activations are through.
One-way latency = arrival (child) - just before the send (here), both time.monotonic.
Idle and exchanging runs alternate, num_pairs of each; each figure is the median of the
runs' (a host stall in one run moves its p99 alone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from bench._kunserve_figures import percentile
from bench._kunserve_peer import StagePeer
from kvtransport import TrafficClass, TransportConfig, make_transport
from services.common.groups import KVTransferSpec
from services.worker.engine import SamplingParams, ScheduledRequest, SchedulerOutput
from services.worker.engine.config import ModelConfig
from services.worker.kunserve.exchange import KVExchange
from services.worker.kunserve.pipeline import link_id, to_host
from services.worker.kunserve.wire import encode_micro_batch

GROUP_KEY = "bench.0"


@dataclass(frozen=True)
class ActivationOptions:
    num_samples: int = 300  # activations per run (idle, exchanging)
    num_pairs: int = 3  # runs of each kind, alternating
    interval_s: float = 0.004  # between two micro-batches leaving stage 0
    num_seqs: int = 8  # requests in a decode micro-batch
    num_requests: int = 8  # requests whose KV one exchange round moves
    context_tokens: int = 1024  # each of those requests' context


def micro_batch(config: ModelConfig, seq: int, options: ActivationOptions, block_size: int):
    """[meta, hidden] of decode micro-batch `seq`, as PipelineDriver sends it."""
    num_blocks = -(-options.context_tokens // block_size)
    batch = SchedulerOutput(num_batched_tokens=options.num_seqs)
    for i in range(options.num_seqs):
        batch.requests.append(
            ScheduledRequest(
                f"req-{i}",
                [(seq + i) % 256],
                options.context_tokens - 1,
                list(range(i * num_blocks, (i + 1) * num_blocks)),
                SamplingParams(max_tokens=1, seed=i),
                True,
            )
        )
    hidden = torch.randn(options.num_seqs, config.hidden_size)  # (T, H)
    return [encode_micro_batch(seq, batch), to_host(hidden)]


class ActivationBench:
    def __init__(self, config: ModelConfig, block_size: int, options: ActivationOptions):
        self.config = config
        self.block_size = block_size
        self.options = options
        num_layers = config.num_layers // 2  # stage 1's half
        self.blocks_per_request = -(-options.context_tokens // block_size)
        self.kv_shape = (  # (layers, 2, blocks, block_size, kv heads, head dim)
            num_layers,
            2,
            self.blocks_per_request,
            block_size,
            config.num_kv_heads,
            config.head_dim,
        )
        self.pool_shape = (*self.kv_shape[:2], options.num_requests * self.blocks_per_request,
                           *self.kv_shape[3:])  # fmt: skip

    async def run(self, progress) -> dict:
        """options.num_pairs pairs of runs (idle, then during an exchange); each figure is
        the median over the pairs (one stall of the host in one run moves its p99 alone)."""
        peer = StagePeer(self.pool_shape)
        transport = make_transport(TransportConfig())  # a worker's defaults
        runs: dict[str, list[list[float]]] = {"idle": [], "exchange": []}
        num_bytes, busy_s, num_rounds = 0, 0.0, 0
        try:
            await transport.start()
            exchange = KVExchange(transport, timeout_s=120.0)
            for k in range(self.options.num_pairs):
                runs["idle"].append(await self._activations(transport, exchange, peer, f"i{k}"))
                stop, flowing = asyncio.Event(), asyncio.Event()
                rounds = asyncio.create_task(
                    self._exchange_rounds(exchange, peer, f"x{k}", stop, flowing)
                )
                await asyncio.wait_for(flowing.wait(), 120)
                try:
                    loaded = await self._activations(transport, exchange, peer, f"a{k}")
                finally:
                    stop.set()
                moved, busy, num = await rounds
                num_bytes, busy_s, num_rounds = num_bytes + moved, busy_s + busy, num_rounds + num
                runs["exchange"].append(loaded)
                progress(
                    f"activations, pair {k}: p99 idle {percentile(runs['idle'][-1], 99):.3f} ms, "
                    f"during the KV exchange {percentile(loaded, 99):.3f} ms"
                )
            await exchange.close()
        finally:
            await transport.close()
            peer.stop()
        figures = {
            f"p{q}_{kind}_ms": statistics.median(percentile(run, q) for run in runs[kind])
            for kind in runs
            for q in (50, 99)
        }
        return {
            **figures,
            "p99_idle_ms_samples": [percentile(run, 99) for run in runs["idle"]],
            "p99_exchange_ms_samples": [percentile(run, 99) for run in runs["exchange"]],
            "exchange_gbps": num_bytes / busy_s / 1e9,
            "exchange_num_rounds": num_rounds,
            "exchange_mib_per_round": round(
                self.options.num_requests * self._kv_nbytes() / 2**20, 1
            ),
            "exchange_num_pauses": exchange.stats.num_pauses,
            "activation_bytes": sum(
                t.numel() * t.element_size()
                for t in micro_batch(self.config, 0, self.options, self.block_size)
            ),  # fmt: skip
            "num_samples": self.options.num_samples,
            "num_pairs": self.options.num_pairs,
            "interval_ms": self.options.interval_s * 1000,
        }

    def _kv_nbytes(self) -> int:
        return torch.Size(self.kv_shape).numel() * 4  # float32

    async def _activations(self, transport, exchange: KVExchange, peer: StagePeer, name: str):
        """One-way latencies (ms) of options.num_samples micro-batches into stage 1."""
        key = f"{GROUP_KEY}-{name}"
        n = self.options.num_samples
        transfer_ids = [link_id(key, "s1", seq) for seq in range(n)]
        payloads = [
            micro_batch(self.config, seq, self.options, self.block_size) for seq in range(n)
        ]
        op_id = peer.request("stage_in", transfer_ids[0].rsplit("/", 1)[0], n)
        await asyncio.sleep(0.05)  # the first receives are posted
        sent_at: list[float] = []
        sends = []

        async def send(seq: int) -> None:  # PipelineDriver._send_async
            with exchange.activation_to(peer.address):
                handle = await transport.send(
                    peer.address, transfer_ids[seq], payloads[seq], TrafficClass.ACTIVATION
                )
                await handle.wait()

        for seq in range(n):
            sent_at.append(time.monotonic())
            sends.append(asyncio.create_task(send(seq)))
            await asyncio.sleep(self.options.interval_s)
        await asyncio.gather(*sends)
        done_at = await peer.reply(op_id)
        return [(done - sent) * 1000 for done, sent in zip(done_at, sent_at, strict=True)]

    async def _exchange_rounds(
        self,
        exchange: KVExchange,
        peer: StagePeer,
        tag: str,
        stop: asyncio.Event,
        flowing: asyncio.Event,
    ) -> tuple[int, float, int]:
        """Exchange rounds until `stop`: (bytes moved, seconds from each round's first
        send to its last arrival summed, rounds)."""
        sources = [
            torch.full(self.kv_shape, float(i + 1)) for i in range(self.options.num_requests)
        ]
        num_bytes, busy_s, num_rounds = 0, 0.0, 0
        while not stop.is_set():
            specs = []
            for i in range(self.options.num_requests):
                blocks = tuple(
                    range(i * self.blocks_per_request, (i + 1) * self.blocks_per_request)
                )
                specs.append(
                    KVTransferSpec(
                        f"kvx/{GROUP_KEY}-{tag}.{num_rounds}/req-{i}/0-1",
                        f"req-{i}",
                        0,
                        1,
                        blocks,
                        blocks,
                        self.config.num_layers // 2,
                        self.config.num_layers,
                    )
                )
            op_id = peer.request("kv_receive", [dataclasses.astuple(s) for s in specs])
            started = time.monotonic()
            for spec, data in zip(specs, sources, strict=True):
                exchange.send(spec, peer.address, data)
            await asyncio.sleep(0.01)
            flowing.set()
            _, last_arrival, errors = await peer.reply(op_id)
            if errors:
                raise RuntimeError(f"KV exchange failed: {errors}")
            await exchange.wait_idle(120.0)
            num_bytes += sum(t.numel() * t.element_size() for t in sources)
            busy_s += last_arrival - started
            num_rounds += 1
        return num_bytes, busy_s, num_rounds
