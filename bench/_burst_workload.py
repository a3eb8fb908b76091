"""The arrivals `llmesh bench burst` plays against each mesh (bench/burst.py's docstring
says what they are): deterministic in the seed, so every policy and `--resim` replay the
same requests at the same times.

Apart from the mesh code because both the live run and the re-simulation of a recorded
run (bench/_burst_report.py) rebuild the workload from the same flags.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

Request = tuple[list[int], dict]


@dataclass(frozen=True)
class Arrival:
    at_s: float  # after the run's start
    request: Request


def workload(args) -> list[Arrival]:
    """Deterministic arrivals: residents, burst, tail (bench/burst.py's docstring)."""
    rng = random.Random(args.seed)

    def request(i: int, prompt_len: int, max_tokens: int) -> Request:
        prompt = [(31 * i + 7 * j + args.seed) % 256 for j in range(prompt_len)]
        sampling = {
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": 5000 + i,
            "temperature": 0.0 if i % 2 else 0.8,
        }
        return prompt, sampling

    arrivals, i = [], 0
    for _ in range(args.residents):
        at = rng.uniform(0, 1.0)
        tokens = rng.randint(args.resident_tokens * 3 // 4, args.resident_tokens)
        prompt_len = rng.randint(args.resident_prompt * 5 // 6, args.resident_prompt)
        arrivals.append(Arrival(at, request(i, prompt_len, tokens)))
        i += 1
    for _ in range(args.burst):
        at = args.burst_at_s + rng.uniform(0, args.burst_s)
        prompt_len = rng.randint(args.burst_prompt // 2, args.burst_prompt)
        arrivals.append(Arrival(at, request(i, prompt_len, args.burst_tokens)))
        i += 1
    t = args.burst_at_s + args.burst_s
    for _ in range(args.tail):
        t += rng.expovariate(args.tail_rate)
        arrivals.append(Arrival(t, request(i, rng.randint(32, 96), rng.randint(32, 64))))
        i += 1
    return sorted(arrivals, key=lambda a: a.at_s)


def reference_tokens(model_dir: Path, arrivals: list[Arrival]) -> list[list[int]]:
    from bench._kunserve_workload import reference_tokens as run_reference

    return run_reference(model_dir, {"burst": [a.request for a in arrivals]})["burst"]


# The flags that shape the workload (a recorded run's are replayed by --resim).
WORKLOAD_ARGS = (
    "residents", "resident_prompt", "resident_tokens", "burst", "burst_at_s", "burst_s",
    "burst_prompt", "burst_tokens", "tail", "tail_rate", "seed",
)  # fmt: skip
