"""Native baseline: UCX's own `ucx_perftest` (shipped in the libucx wheel), tag bandwidth.

Runs a server and a client process on loopback with the same UCX settings kvtransport
uses (no peer error handling, so shared memory/CMA), and returns GB/s (1e9 bytes/s).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

RUN_TIMEOUT_S = 120.0


def find_perftest() -> Path | None:
    try:
        import libucx
    except ImportError:
        return None
    binary = Path(libucx.__file__).parent / "bin" / "ucx_perftest"
    return binary if binary.exists() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_shape(nbytes: int) -> tuple[int, int]:
    """(timed messages, untimed warm-up messages before them) of one streamed run: 1 GiB
    (20 to 1000 messages) after a tenth as many. kvtransport's stream uses the same."""
    iterations = max(20, min(1000, (1 << 30) // nbytes))
    return iterations, iterations // 10


def tag_bandwidth_gbps(binary: Path, nbytes: int, window: int | None = None) -> float:
    """Bandwidth of `ucx_perftest -t tag_bw` for nbytes messages (window None: its default)."""
    iterations, warmup = stream_shape(nbytes)
    args = ["-t", "tag_bw", "-s", str(nbytes), "-n", str(iterations), "-w", str(warmup)]
    if window is not None:
        args += ["-O", str(window)]
    env = dict(os.environ)
    library_dir = binary.parent.parent / "lib"
    env["LD_LIBRARY_PATH"] = f"{library_dir}:{env.get('LD_LIBRARY_PATH', '')}"
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    port = str(_free_port())
    server = subprocess.Popen(
        [str(binary), *args, "-p", port],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # the server needs a moment to listen
            time.sleep(0.1)
            client = subprocess.run(
                [str(binary), "127.0.0.1", *args, "-p", port, "-f"],
                env=env,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
            if client.returncode == 0:
                return _parse_bandwidth(client.stdout) * (1 << 20) / 1e9
        raise RuntimeError(f"ucx_perftest client failed: {client.stderr.strip()[-300:]}")
    finally:
        server.kill()
        server.wait()


def _parse_bandwidth(output: str) -> float:
    """MB/s (MiB/s in perftest's units), the 'overall' bandwidth column of the result row."""
    for line in output.splitlines():
        numbers = re.findall(r"[-+]?\d+(?:\.\d+)?", line)
        if len(numbers) == 8:  # iterations, 3 latency columns, 2 bandwidth, 2 message rate
            return float(numbers[5])
    raise RuntimeError(f"cannot parse ucx_perftest output: {output[-300:]!r}")
