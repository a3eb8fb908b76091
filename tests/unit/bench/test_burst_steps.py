"""bench/_burst_steps.py: the workers' engine_step lines read back and set against a cost
model, on hand-written logs."""

import json

from bench._burst_steps import (
    busy_workers,
    cost_scale,
    join_cpu_s,
    read_steps,
    step_windows,
    summarise,
)
from bench.burst import _parse


def _line(start_s: float, wall_ms: float, cpu_ms: float, features: list[int]) -> str:
    return json.dumps(
        {
            "start_ns": round((1000.0 + start_s) * 1e9),
            "wall_ms": wall_ms,
            "cpu_ms": cpu_ms,
            "features": features,
            "event": "engine_step",
            "service": "worker",
        }
    )


def _logs(tmp_path):
    w0 = tmp_path / "worker-0.log"
    w1 = tmp_path / "worker-1.log"
    w0.write_text(
        "\n".join(
            [
                '{"event": "worker_ready", "service": "worker"}',
                _line(0.0, 400.0, 200.0, [1, 100, 1, 100, 5050]),
                "not json",
                _line(5.0, 100.0, 100.0, [1, 2, 2, 300, 300]),
            ]
        )
        + "\n"
    )
    w1.write_text(_line(0.2, 200.0, 100.0, [1, 50, 1, 50, 1275]) + "\n")
    return [w0, w1, tmp_path / "worker-2.log"]  # a worker without a log counts nothing


def test_steps_are_read_in_start_order_relative_to_the_run(tmp_path):
    steps = read_steps(_logs(tmp_path), 1000.0)
    assert [(s.worker, round(s.start_s, 6), s.wall_s, s.cpu_s) for s in steps] == [
        (0, 0.0, 0.4, 0.2),
        (1, 0.2, 0.2, 0.1),
        (0, 5.0, 0.1, 0.1),
    ]
    assert steps[0].features == (1.0, 100.0, 1.0, 100.0, 5050.0)


def test_busy_workers_is_the_mean_count_over_each_step(tmp_path):
    steps = read_steps(_logs(tmp_path), 1000.0)
    # Step 0 (0-0.4 s) overlaps step 1 (0.2-0.4 s) for half its length: 1.5; step 1
    # is overlapped all along: 2; the last one runs alone.
    assert [round(b, 6) for b in busy_workers(steps)] == [1.5, 2.0, 1.0]


def test_summary_per_window(tmp_path):
    steps = read_steps(_logs(tmp_path), 1000.0)
    coefficients = (0.001, 0.001, 0.0, 0.0, 0.0)  # 1 ms + 1 ms per token
    summary = summarise(steps, coefficients, [("early", 0.0, 1.0), ("late", 1.0, 9.0)])
    assert summary["early"] == {
        "num_steps": 2,
        "model_s": 0.152,  # 0.101 + 0.051
        "cpu_s": 0.3,
        "wall_s": 0.6,
        "cpu_per_model": 1.974,
        "wall_per_cpu": 2.0,
        "busy_workers": 1.67,  # (1.5 x 0.4 + 2 x 0.2) / 0.6
    }
    assert summary["late"]["num_steps"] == 1 and summary["late"]["wall_per_cpu"] == 1.0
    assert "none" not in summarise(steps, coefficients, [("none", 20.0, 30.0)])


def test_the_windows_follow_the_workload():
    windows = step_windows(_parse([]))
    assert windows == [("residents", 0.0, 3.0), ("burst", 3.0, 5.0), ("after", 5.0, float("inf"))]


def test_join_cpu_comes_from_the_group_joined_lines(tmp_path):
    log = tmp_path / "worker-0.log"
    log.write_text(
        '{"event": "group_joined", "join_cpu_ms": 42.5}\n'
        '{"event": "group_joined"}\n'  # a worker from before the field: not counted
        + _line(0.0, 1.0, 1.0, [1, 1, 1, 1, 1])
        + '\n{"event": "group_joined", "join_cpu_ms": 7.5}\n'
    )
    assert join_cpu_s([log, tmp_path / "missing.log"]) == [0.0425, 0.0075]


def test_the_step_cost_scale_is_cpu_over_model_of_the_phases_that_set_the_ttfts():
    summary = {
        "residents": {"model_s": 4.0, "cpu_s": 5.0},
        "burst": {"model_s": 1.0, "cpu_s": 1.2},
        "after": {"model_s": 10.0, "cpu_s": 30.0},  # decodes after the burst: left out
    }
    assert cost_scale(summary) == 1.24  # (5.0 + 1.2) / (4.0 + 1.0)
    assert cost_scale({"after": {"model_s": 1.0, "cpu_s": 2.0}}) is None
    assert cost_scale({}) is None and cost_scale(None) is None
