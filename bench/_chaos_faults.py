"""The faults of `llmesh bench chaos`: a seeded plan of rounds, and how each fault is
injected (SIGKILL at the moment it names) into the live mesh.

    migration_{src,dst}_{stage0,stage1,commit}
                        a live migration of a decoding request; when the source reaches
                        the point (bench/_chaos_hooks.py) the source or the destination
                        is killed
    kunserve_exchange_{sender,peer}
                        two workers drop into a KunServe group; when a member is about
                        to send a request's KV, it or the other member is killed
    worker_decoding     a worker with running requests is killed
    scheduler           the scheduler is killed and restarted at its address
    gateway             a gateway is killed and restarted at its address

A round runs worker faults on disjoint workers, and meanwhile kills the scheduler and a
gateway PROCESS_FAULTS_PER_ROUND times each (one after the other, each once the
previous one is back; no scheduler fault with a KunServe fault: a drop needs the
scheduler); each killed worker is replaced by a fresh one as soon as its fault is done. The plan (kinds, choices, delays)
depends only on the seed; a fault whose point is never reached (its request finished
first) is `missed`, not counted, drawn again the next round, and the rounds go on
until enough were injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import grpc

from bench._chaos_load import Load
from bench._chaos_mesh import NUM_GATEWAYS, ChaosMesh

MIGRATION_KINDS = tuple(
    f"migration_{role}_{point}"
    for point in ("stage0", "stage1", "commit")
    for role in ("src", "dst")
)
KUNSERVE_KINDS = ("kunserve_exchange_sender", "kunserve_exchange_peer")
WORKER_KINDS = (*MIGRATION_KINDS, *KUNSERVE_KINDS, "worker_decoding")
PROCESS_KINDS = ("scheduler", "gateway")
ALL_KINDS = (*WORKER_KINDS, *PROCESS_KINDS)
WORKERS_NEEDED = {**dict.fromkeys(MIGRATION_KINDS + KUNSERVE_KINDS, 2), "worker_decoding": 1}
# A process fault takes a few seconds (kill, down, restart), a worker fault longer (its
# replacement loads the model): the scheduler and each gateway die this often a round.
PROCESS_FAULTS_PER_ROUND = 2
POINT_TIMEOUT_S = 8.0  # a fault whose point is not reached by then is missed
MIN_TOKENS_LEFT = 150  # a migrated request has this many tokens to go (it must outlive it)


@dataclass
class Fault:
    kind: str
    pick: float  # seeded choice among the candidates
    delay_s: float  # after the round starts
    down_s: float = 0.0  # process faults: how long the process stays dead
    injected: bool = False
    victim: str = ""
    at: float = 0.0  # monotonic kill time
    request_ids: set[str] = field(default_factory=set)  # requests it hit on purpose
    note: str = ""
    took_s: float = 0.0  # from the injection to the replacement's registration


def plan_round(rng: random.Random, deck: list[str], num_workers: int):
    """One round: worker faults drawn from a shuffled deck of every worker kind, on at
    most num_workers workers, and the process faults."""
    faults = []
    budget = num_workers
    has_kunserve = False
    while deck and WORKERS_NEEDED[deck[-1]] <= budget:
        kind = deck.pop()
        budget -= WORKERS_NEEDED[kind]
        has_kunserve |= kind in KUNSERVE_KINDS
        faults.append(Fault(kind, rng.random(), rng.uniform(0.0, 0.5)))
    for process in PROCESS_KINDS:
        for _ in range(PROCESS_FAULTS_PER_ROUND):
            if process == "scheduler" and has_kunserve:
                continue
            faults.append(
                Fault(process, rng.random(), rng.uniform(0.2, 1.5), rng.uniform(0.3, 2.0))
            )
    return faults


def refill(rng: random.Random, deck: list[str]) -> None:
    if not deck:
        deck.extend(WORKER_KINDS)
        rng.shuffle(deck)


class Injector:
    """Injects one round's faults at once; a killed worker's replacement starts as soon
    as its fault is done, the round ends once every replacement registered."""

    def __init__(self, mesh: ChaosMesh, load: Load) -> None:
        self.mesh = mesh
        self.load = load
        self._claimed: set[str] = set()
        self._infos: dict = {}
        self._pending: list[asyncio.Future] = []

    async def run_round(self, faults: list[Fault]) -> None:
        self._claimed = set()
        # Before any process fault: a migration finds its destination here even while
        # the scheduler is dead.
        state = await self.mesh.cluster_state()
        self._infos = {i.info.instance_id: i.info for i in state.instances}
        chains = [[f for f in faults if f.kind == kind] for kind in PROCESS_KINDS]
        await asyncio.gather(
            *(self._inject(f) for f in faults if f.kind in WORKER_KINDS),
            *(self._inject_in_turn(chain) for chain in chains),
        )

    async def _inject_in_turn(self, faults: list[Fault]) -> None:
        """Faults of one process kind, each once the previous one's process is back."""
        for fault in faults:
            await self._inject(fault)

    async def _inject(self, fault: Fault) -> None:
        await asyncio.sleep(fault.delay_s)
        start = time.monotonic()
        await self._inject_now(fault)
        if fault.kind in WORKER_KINDS and fault.injected:
            await self.mesh.restart_workers(1)
        fault.took_s = time.monotonic() - start

    async def _inject_now(self, fault: Fault) -> None:
        try:
            if fault.kind in MIGRATION_KINDS:
                await self._migration(fault)
            elif fault.kind in KUNSERVE_KINDS:
                await self._kunserve(fault)
            elif fault.kind == "worker_decoding":
                await self._worker_decoding(fault)
            elif fault.kind == "scheduler":
                await self._scheduler(fault)
            else:
                await self._gateway(fault)
        except (grpc.RpcError, TimeoutError) as exc:
            if not fault.injected:
                fault.note = f"missed: {type(exc).__name__}: {exc}"[:200]

    def _settle_later(self, call: asyncio.Future) -> None:
        """An admin call whose answer no longer matters (its peer was killed): awaited
        by `settle()`, not by the fault, which goes on to the replacement."""
        self._pending.append(call)

    async def settle(self) -> None:
        """Wait for the admin calls left running (each has its deadline)."""
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending = []

    def _kill_worker(self, fault: Fault, instance_id: str) -> None:
        proc = self.mesh.worker(instance_id)
        fault.victim, fault.at = instance_id, time.monotonic()
        proc.kill()
        fault.injected = True
        fault.request_ids |= {
            r.request_id
            for r in self.load.records
            if r.ended is None and instance_id in r.instances
        }

    async def _loads(self) -> dict:
        """instance id -> its load report, for live workers that serve alone."""
        found = {}
        for w in self.mesh.live_workers():
            with contextlib.suppress(grpc.RpcError):
                report = await self.mesh.load(w.address)
                if not report.group_id:
                    found[w.name] = report
        return found

    async def _claim(self, fault: Fault, want_running: int, count: int) -> list[tuple]:
        """`count` unclaimed workers, the first with a request of at least
        MIN_TOKENS_LEFT tokens to go (its id second), polling up to POINT_TIMEOUT_S."""
        deadline = time.monotonic() + POINT_TIMEOUT_S
        while time.monotonic() < deadline:
            # Workers the round started with (a replacement started meanwhile by another
            # fault of the round has no entry in _infos: no migration target yet).
            loads = {
                k: v
                for k, v in (await self._loads()).items()
                if k not in self._claimed and k in self._infos
            }
            candidates = []
            for name, report in sorted(loads.items()):
                for running in report.running:
                    left = self._tokens_left(running)
                    if left >= MIN_TOKENS_LEFT and report.num_running >= want_running:
                        candidates.append((-left, name, running.request_id))
            # One of the 3 with the most tokens to go: the likeliest to reach the point.
            candidates = [c[1:] for c in sorted(candidates)[:3]]
            if candidates and len(loads) >= count:
                name, request_id = candidates[int(fault.pick * len(candidates))]
                others = sorted(set(loads) - {name})
                rng = random.Random(fault.pick)
                chosen = [name, *rng.sample(others, count - 1)]
                self._claimed |= set(chosen)
                return [(n, request_id) for n in chosen]
            await asyncio.sleep(0.1)
        raise TimeoutError("no worker with a long enough running request")

    def _tokens_left(self, running) -> int:
        record = self.load.by_id().get(running.request_id)
        if record is None:
            return 0
        spec = self.load.specs[record.spec_index]
        return len(spec.prompt) + spec.sampling["max_tokens"] - running.num_tokens

    async def _wait_hit(self, workers) -> tuple:
        deadline = time.monotonic() + POINT_TIMEOUT_S
        while time.monotonic() < deadline:
            for w in workers:
                if self.mesh.hit(w):
                    self.mesh.clear_hit(w)
                    return w
            await asyncio.sleep(0.02)
        return None

    async def _migration(self, fault: Fault) -> None:
        _, role, point = fault.kind.split("_")
        (src_name, request_id), (dst_name, _) = await self._claim(fault, 1, 2)
        src = self.mesh.worker(src_name)
        self.mesh.arm(src, point)
        migration = asyncio.ensure_future(self.mesh.migrate(src, self._infos[dst_name], request_id))
        hit = await self._wait_hit([src])
        self.mesh.disarm(src)
        if hit is None:
            fault.note = "missed: the point was not reached"
            with contextlib.suppress(grpc.RpcError):
                for result in await migration:  # usually ABORTED: the request finished
                    fault.note += f"; {result.reason}"[:120]
            return
        fault.request_ids.add(request_id)
        self._kill_worker(fault, src_name if role == "src" else dst_name)
        self._settle_later(migration)  # it ends on its own (aborted or failed)

    async def _kunserve(self, fault: Fault) -> None:
        (a, _), (b, _) = await self._claim(fault, 1, 2)
        members = [self.mesh.worker(a), self.mesh.worker(b)]
        for m in members:
            self.mesh.arm(m, "exchange")
        fault.request_ids |= {
            r.request_id
            for report in (await self._loads()).values()
            if report.instance_id in (a, b)
            for r in report.running
        }
        drop = asyncio.ensure_future(self.mesh.drop_group([a, b]))
        hit = await self._wait_hit(members)
        for m in members:
            self.mesh.disarm(m)
        if hit is None:
            fault.note = "missed: no exchange reached"
            reply = await drop
            await self.mesh.restore_group(reply.group.group_id)
            return
        sender = hit.name
        peer = b if sender == a else a
        self._kill_worker(fault, sender if fault.kind.endswith("sender") else peer)
        self._settle_later(drop)

    async def _worker_decoding(self, fault: Fault) -> None:
        ((name, _),) = await self._claim(fault, 2, 1)
        self._kill_worker(fault, name)

    async def _scheduler(self, fault: Fault) -> None:
        fault.victim, fault.at = "scheduler", time.monotonic()
        self.mesh.kill_scheduler()
        fault.injected = True
        await asyncio.sleep(fault.down_s)
        await self.mesh.restart_scheduler()

    async def _gateway(self, fault: Fault) -> None:
        index = int(fault.pick * NUM_GATEWAYS)
        fault.victim, fault.at = f"gateway-{index}", time.monotonic()
        fault.request_ids = {
            r.request_id for r in self.load.records if r.ended is None and r.gateway == index
        }
        self.mesh.kill_gateway(index)
        fault.injected = True
        await asyncio.sleep(fault.down_s)
        await self.mesh.restart_gateway(index)
