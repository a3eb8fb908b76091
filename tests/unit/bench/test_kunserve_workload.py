"""The request sets of `llmesh bench kunserve_mechanism` are fixed and named."""

from __future__ import annotations

from bench._kunserve_workload import make_workloads, workload


def test_workload_is_deterministic_greedy_and_seeded_alternately():
    assert workload(2, 3, 5, 0) == [
        ([0, 7, 14], {"max_tokens": 5, "ignore_eos": True, "seed": 1000, "temperature": 0.8}),
        ([31, 38, 45, 52], {"max_tokens": 5, "ignore_eos": True, "seed": 1001, "temperature": 0.0}),
    ]


def test_make_workloads_names_one_batch_and_two_sets_per_group_size():
    workloads = make_workloads([2, 4], batch_size=3, prompt_len=8, max_tokens=5)
    assert list(workloads) == ["batch", "running2", "restoring2", "running4", "restoring4"]
    assert [len(v) for v in workloads.values()] == [3, 4, 4, 8, 8]
    assert len(workloads["running2"][0][0]) == 32  # 4x the prompt: more KV to exchange
    assert len(workloads["restoring2"][0][0]) == 8
