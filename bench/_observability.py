"""`bench serve`'s observability cost: the same mesh workload with tracing and metrics
off and on, side by side.

    off   no OTLP export, no /metrics endpoint (metrics not recorded)
    on    every span exported over OTLP/gRPC to a receiver on loopback (it only counts
          them), sampling 1; every service's /metrics endpoint scraped each second,
          as a Prometheus server would

Both meshes run at once (one worker each, the same flags); their runs alternate for
`rounds` rounds (which goes first alternates too) and the best of each counts, so
other load on the machine hits both alike. observability_overhead_pct = (1 - on / off) x 100 of output tokens per second.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable

from bench._otlp_receiver import OtlpReceiver

# Environment of a mesh without observability (the services' own variables).
TELEMETRY_OFF = {
    f"LLMESH_{service}_TELEMETRY_METRICS_BIND": "none"
    for service in ("GATEWAY", "SCHEDULER", "WORKER")
}
SCRAPE_INTERVAL_S = 1.0


class _Scraper:
    """GETs every /metrics address each interval on a thread, as Prometheus does."""

    def __init__(self, addresses: list[str]) -> None:
        self._urls = [f"http://{a}/metrics" for a in addresses]
        self._stop = threading.Event()
        self.num_scrapes = 0
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_S):
            for url in self._urls:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    reply.read()
                self.num_scrapes += 1

    def __enter__(self) -> _Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    start_mesh: Callable[[dict[str, str]], object],
    run_mesh: Callable[[str], tuple[float, list[list[int]]]],
    off_address: str,
    rounds: int,
    num_tokens: int,
    expected: list[list[int]],
) -> dict:
    """start_mesh(env) starts a mesh; run_mesh(gateway address) runs the workload on it
    and returns (seconds, tokens per request). off_address: a mesh already started with
    TELEMETRY_OFF. Returns the figures for the bench's JSON."""
    receiver = OtlpReceiver(keep_spans=False).start()
    on_mesh = start_mesh({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    off_runs, on_runs, identical = [], [], True
    try:
        addresses = [p.metrics_address for p in on_mesh.processes()]
        with _Scraper(addresses) as scraper:
            for round_index in range(rounds):
                # Which goes first alternates: a run right after the other one's finds
                # the machine (caches, the other mesh's idle threads) in another state.
                if round_index % 2:
                    on_s, on_tokens = run_mesh(on_mesh.gateway_address)
                    off_s, off_tokens = run_mesh(off_address)
                else:
                    off_s, off_tokens = run_mesh(off_address)
                    on_s, on_tokens = run_mesh(on_mesh.gateway_address)
                off_runs.append(off_s)
                on_runs.append(on_s)
                identical = identical and off_tokens == on_tokens == expected
                print(
                    f"round {round_index + 1}: observability off {num_tokens / off_s:8.1f} "
                    f"tokens/s   on {num_tokens / on_s:8.1f} tokens/s",
                    flush=True,
                )
    finally:
        on_mesh.stop()
        receiver.stop()
    off_tps, on_tps = num_tokens / min(off_runs), num_tokens / min(on_runs)
    overhead = (1 - on_tps / off_tps) * 100
    print(
        f"observability: off {off_tps:8.1f} tokens/s   on {on_tps:8.1f} tokens/s   "
        f"overhead {overhead:.2f}%  ({receiver.num_spans} spans exported, "
        f"{scraper.num_scrapes} scrapes)",
        flush=True,
    )
    return {
        "observability_off_tokens_per_s": round(off_tps, 1),
        "observability_on_tokens_per_s": round(on_tps, 1),
        "observability_overhead_pct": round(overhead, 2),
        "observability_spans_exported": receiver.num_spans,
        "observability_identical_tokens": identical,
    }
