"""The scheduler alone (no model): exact chunks, admissions, victims and stops."""

from __future__ import annotations

from services.worker.engine import EngineConfig, RequestStatus, SamplingParams, Scheduler
from services.worker.engine.request import Request

EOS = 99


def make_scheduler(make_block_manager, num_blocks=8, block_size=4, **config) -> Scheduler:
    return Scheduler(EngineConfig(**config), make_block_manager(num_blocks, block_size), 64, (EOS,))


def add(
    scheduler: Scheduler,
    request_id: str,
    num_prompt_tokens: int,
    arrival: float,
    priority: int = 0,
    **params,
) -> Request:
    params.setdefault("max_tokens", 100)
    request = Request(
        request_id,
        list(range(1, num_prompt_tokens + 1)),
        SamplingParams(**params),
        priority,
        arrival,
        seq_no=int(arrival * 10),
    )
    scheduler.add_waiting(request)
    return request


def chunks(output) -> list[tuple[str, int, int, bool]]:
    return [
        (r.request_id, r.num_computed_tokens, len(r.token_ids), r.is_sampling)
        for r in output.requests
    ]


def step(scheduler: Scheduler, token_id: int = 7):
    output = scheduler.schedule()
    results = scheduler.update_from_output(
        output, [token_id] * sum(r.is_sampling for r in output.requests)
    )
    return output, results


def finish_all(scheduler: Scheduler) -> None:
    for request in list(scheduler.requests.values()):
        scheduler.finish(request, RequestStatus.FINISHED_ABORTED)


def test_long_prompts_are_chunked_by_the_token_budget(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=16, max_num_batched_tokens=8)
    add(s, "a", 10, arrival=1.0)
    add(s, "b", 5, arrival=2.0)
    out, _ = step(s)
    assert chunks(out) == [("a", 0, 8, False)]
    out, results = step(s)
    assert chunks(out) == [("a", 8, 2, True), ("b", 0, 5, True)]
    assert [(r.request_id, r.new_token_ids, r.first_token_index) for r in results] == [
        ("a", [7], 0),
        ("b", [7], 0),
    ]
    out, _ = step(s)
    assert chunks(out) == [("a", 10, 1, True), ("b", 5, 1, True)]
    finish_all(s)


def test_chunk_of_a_prompt_that_exactly_fills_the_budget(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=16, max_num_batched_tokens=6)
    add(s, "a", 4, arrival=1.0)
    add(s, "b", 5, arrival=2.0)
    out, _ = step(s)
    assert chunks(out) == [("a", 0, 4, True), ("b", 0, 2, False)]
    out, _ = step(s)
    assert chunks(out) == [("a", 4, 1, True), ("b", 2, 3, True)]
    assert s.block_manager.block_ids("a") == [0, 2]
    assert s.block_manager.block_ids("b") == [1, 3]
    finish_all(s)


def test_preemption_picks_the_latest_arrival_and_requeues_it_first(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=4, block_size=4)
    preempted = []
    s.preemption_callbacks.append(preempted.append)
    add(s, "a", 4, arrival=1.0)
    add(s, "b", 4, arrival=2.0)
    add(s, "c", 4, arrival=3.0)
    out, _ = step(s)  # 3 blocks used, each request's 4 slots full
    assert chunks(out) == [("a", 0, 4, True), ("b", 0, 4, True), ("c", 0, 4, True)]
    out, _ = step(s)  # each needs a 2nd block, one is free: a gets it, b takes c's
    assert out.preempted_request_ids == ["c"]
    assert preempted == ["c"]
    assert chunks(out) == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert s.block_manager.block_ids("b") == [1, 2]
    assert [r.request_id for r in s.waiting] == ["c"]
    assert s.requests["c"].num_computed_tokens == 0
    assert s.requests["c"].output_token_ids == [7]  # outputs survive preemption
    out, _ = step(s)  # c is not admitted while a and b still hold every block
    assert chunks(out) == [("a", 5, 1, True), ("b", 5, 1, True)]
    assert s.num_preemptions == 1
    finish_all(s)


def test_priority_policy_runs_high_priority_first_and_preempts_low(make_block_manager):
    s = make_scheduler(
        make_block_manager, num_blocks=2, block_size=4, scheduling_policy="priority", max_num_seqs=8
    )
    add(s, "low", 4, arrival=1.0, priority=0)
    add(s, "high", 4, arrival=2.0, priority=1)
    out, _ = step(s)
    assert chunks(out) == [("high", 0, 4, True), ("low", 0, 4, True)]
    out, _ = step(s)  # both need a second block, none free: low is the victim
    assert out.preempted_request_ids == ["low"]
    assert chunks(out) == [("high", 4, 1, True)]
    finish_all(s)


def test_head_of_line_request_blocks_later_ones(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=4, block_size=4)
    add(s, "a", 8, arrival=1.0)
    add(s, "big", 12, arrival=2.0)  # needs 3 blocks, only 2 left
    add(s, "small", 2, arrival=3.0)  # would fit, but FCFS keeps it behind "big"
    out, _ = step(s)
    assert chunks(out) == [("a", 0, 8, True)]
    assert [r.request_id for r in s.waiting] == ["big", "small"]
    finish_all(s)


def test_max_num_seqs_caps_the_running_batch(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=16, max_num_seqs=2)
    for i, name in enumerate("abc"):
        add(s, name, 2, arrival=float(i))
    out, _ = step(s)
    assert [r.request_id for r in out.requests] == ["a", "b"]
    finish_all(s)


def test_stop_conditions(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=16)
    add(s, "eos", 2, arrival=1.0)
    add(s, "eos_ignored", 2, arrival=2.0, ignore_eos=True, max_tokens=2)
    add(s, "stop_id", 2, arrival=3.0, stop_token_ids=(5,))
    out = s.schedule()
    results = s.update_from_output(out, [EOS, EOS, 5])
    assert [(r.request_id, r.finished, r.finish_reason) for r in results] == [
        ("eos", True, "stop"),
        ("eos_ignored", False, None),
        ("stop_id", True, "stop"),
    ]
    out = s.schedule()
    results = s.update_from_output(out, [EOS])
    assert [(r.request_id, r.finished, r.finish_reason, r.first_token_index) for r in results] == [
        ("eos_ignored", True, "length", 1)
    ]
    assert s.block_manager.num_free_blocks == 16


def test_context_limit_finishes_with_length(make_block_manager):
    s = Scheduler(EngineConfig(), make_block_manager(16, 4), 6, (EOS,))
    add(s, "a", 5, arrival=1.0)
    _, results = step(s)
    assert (results[0].finished, results[0].finish_reason) == (
        True,
        "length",
    )  # 6 tokens == context


def test_suspended_requests_keep_blocks_and_are_skipped(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=8)
    add(s, "a", 3, arrival=1.0)
    add(s, "b", 3, arrival=2.0)
    step(s)
    s.requests["a"].set_status(RequestStatus.SUSPENDED)
    out, _ = step(s)
    assert chunks(out) == [("b", 3, 1, True)]
    assert s.block_manager.block_ids("a") == [0]
    finish_all(s)


# ---- micro-batches (a KunServe group's leader) -------------------------------------------


def micro_step(scheduler: Scheduler, exclude=frozenset(), max_num_seqs=8, budget=64):
    output = scheduler.schedule_micro_batch(exclude, max_num_seqs, budget)
    results = scheduler.update_from_output(
        output, [7] * sum(r.is_sampling for r in output.requests)
    )
    return output, results


def test_micro_batch_leaves_excluded_requests_out_and_takes_its_own_limits(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=16, max_num_seqs=2)
    for i, name in enumerate("abcd"):
        add(s, name, 3, arrival=float(i))
    # The engine's max_num_seqs (2) does not cap a micro-batch: its own limits do.
    out = s.schedule_micro_batch(set(), max_num_seqs=3, max_num_batched_tokens=64)
    assert chunks(out) == [("a", 0, 3, True), ("b", 0, 3, True), ("c", 0, 3, True)]
    # a, b, c are in flight: the next micro-batch takes only d, even with room for more.
    second = s.schedule_micro_batch({"a", "b", "c"}, max_num_seqs=3, max_num_batched_tokens=64)
    assert chunks(second) == [("d", 0, 3, True)]
    assert s.schedule_micro_batch({"a", "b", "c", "d"}, 3, 64).is_empty
    s.update_from_output(out, [7, 7, 7])
    # The token budget cuts a micro-batch like a step's; waiting requests in `exclude`
    # are skipped without blocking the line.
    add(s, "e", 5, arrival=5.0)
    add(s, "f", 5, arrival=6.0)
    third = s.schedule_micro_batch({"d", "e"}, max_num_seqs=8, max_num_batched_tokens=6)
    assert chunks(third) == [
        ("a", 3, 1, True),
        ("b", 3, 1, True),
        ("c", 3, 1, True),
        ("f", 0, 3, False),
    ]
    assert [r.request_id for r in s.waiting] == ["e"]
    finish_all(s)


def test_micro_batch_never_preempts_an_excluded_request(make_block_manager):
    s = make_scheduler(make_block_manager, num_blocks=4, block_size=4)
    preempted = []
    s.preemption_callbacks.append(preempted.append)
    for i, name in enumerate("abc"):
        add(s, name, 4, arrival=float(i))
    micro_step(s)  # a, b, c hold blocks 0, 1, 2, each full
    # a and b need a second block, one is free. schedule() would take it from c, the
    # latest arrival; with c in flight (excluded), b is the victim instead.
    out, _ = micro_step(s, exclude={"c"})
    assert out.preempted_request_ids == ["b"] and preempted == ["b"]
    assert chunks(out) == [("a", 4, 1, True)]
    assert s.block_manager.block_ids("c") == [2]
    assert s.requests["c"].num_computed_tokens == 4
    # b's freed block goes to c once c is back; a, in flight now, keeps its blocks.
    out, _ = micro_step(s, exclude={"a"})
    assert out.preempted_request_ids == []
    assert chunks(out) == [("c", 4, 1, True)]  # b (5 tokens) needs 2 blocks: none free
    assert s.block_manager.block_ids("c") == [2, 1]
    assert [r.request_id for r in s.waiting] == ["b"]
    finish_all(s)


def test_schedule_is_unchanged_by_micro_batches(make_block_manager):
    # The normal step keeps the engine's running cap (max_num_seqs) and picks the latest
    # arrival as victim: test_preemption_* and test_max_num_seqs_* above; here, after
    # micro-batches, schedule() still takes every running request.
    s = make_scheduler(make_block_manager, num_blocks=16, max_num_seqs=2)
    add(s, "a", 2, arrival=1.0)
    add(s, "b", 2, arrival=2.0)
    micro_step(s, max_num_seqs=1)
    out, _ = step(s)
    assert chunks(out) == [("a", 2, 1, True), ("b", 0, 2, True)]
    finish_all(s)
