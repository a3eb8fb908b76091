"""SharedHost: processor sharing of jobs on a few cores, in virtual time."""

import pytest

from services.simulator.host import SharedHost
from services.simulator.loop import EventLoop


def run_jobs(num_cores, jobs, num_background_jobs=0.0):
    """jobs: (start_s, key, work_s). Returns {key: end time}, and the host."""
    loop = EventLoop()
    host = SharedHost(loop, num_cores, num_background_jobs)
    ends = {}

    def start(job):
        _, key, work_s = job
        host.run(key, work_s, lambda k: ends.__setitem__(k, loop.now), key)

    for job in jobs:
        loop.at(job[0], start, job)
    loop.run(lambda: False)
    return ends, host


def test_a_job_alone_runs_at_full_speed():
    ends, host = run_jobs(2, [(0.5, "a", 0.004)])
    assert ends == {"a": pytest.approx(0.504)}
    assert host.busy_core_s == pytest.approx(0.004)
    assert host.num_running == 0


def test_no_slowdown_while_jobs_fit_the_cores():
    ends, _ = run_jobs(2, [(0.0, "a", 0.004), (0.001, "b", 0.002)])
    assert ends == {"a": pytest.approx(0.004), "b": pytest.approx(0.003)}


def test_three_equal_jobs_on_two_cores_end_together():
    ends, host = run_jobs(2, [(0.0, k, 0.004) for k in "abc"])
    assert ends == {k: pytest.approx(0.006) for k in "abc"}
    assert host.busy_core_s == pytest.approx(0.012)


def test_speed_changes_when_a_job_starts_and_when_one_ends():
    # The module docstring's example: 2 and 4 ms at 0, 4 ms more at 1 ms.
    #   0-1 ms full speed (1 and 3 ms left); 1-2.5 ms all at 2/3 (a ends: 0 left, b 2,
    #   c 3); then b and c at full speed: b ends at 4.5 ms, c at 5.5 ms.
    ends, _ = run_jobs(2, [(0.0, "a", 0.002), (0.0, "b", 0.004), (0.001, "c", 0.004)])
    assert ends == {
        "a": pytest.approx(0.0025),
        "b": pytest.approx(0.0045),
        "c": pytest.approx(0.0055),
    }


def test_fractional_cores():
    # 1.5 cores, three jobs: each at half speed.
    ends, _ = run_jobs(1.5, [(0.0, k, 0.001) for k in "abc"])
    assert ends == {k: pytest.approx(0.002) for k in "abc"}


def test_a_key_can_run_again_and_stale_ends_are_ignored():
    loop = EventLoop()
    host = SharedHost(loop, 1)
    ends = []

    def again(key):
        ends.append((key, loop.now))
        if key == "a" and len(ends) == 1:
            host.run("a", 0.001, again, "a")  # the same key, right away

    host.run("a", 0.001, again, "a")
    host.run("b", 0.003, again, "b")  # both at half speed: "a"'s first end moves to 2 ms
    loop.run(lambda: False)
    # a: 2 ms (half speed); a again: 1 ms at half speed -> 4 ms; b: 1 ms done by 2 ms,
    # 1 ms more by 4 ms, the last 1 ms alone -> 5 ms.
    assert ends == [
        ("a", pytest.approx(0.002)),
        ("a", pytest.approx(0.004)),
        ("b", pytest.approx(0.005)),
    ]


def test_a_key_runs_once_at_a_time():
    host = SharedHost(EventLoop(), 1)
    host.run("a", 0.001, lambda _: None)
    with pytest.raises(AssertionError, match="already running"):
        host.run("a", 0.001, lambda _: None)


@pytest.mark.parametrize("num_cores", [0, -1.0])
def test_needs_cores(num_cores):
    with pytest.raises(ValueError, match=f"num_cores={num_cores} must be > 0"):
        SharedHost(EventLoop(), num_cores)


def test_background_threads_take_their_share():
    # 2 cores, 3 other runnable threads: a job alone gets 2/4 of a core, two get 2/5.
    ends, host = run_jobs(2, [(0.0, "a", 0.004)], num_background_jobs=3)
    assert ends == {"a": pytest.approx(0.008)}
    ends, _ = run_jobs(2, [(0.0, "a", 0.004), (0.0, "b", 0.004)], num_background_jobs=3)
    assert ends == {"a": pytest.approx(0.010), "b": pytest.approx(0.010)}
    # One background thread on 2 cores leaves a lone job its full core.
    ends, _ = run_jobs(2, [(0.0, "a", 0.004)], num_background_jobs=1)
    assert ends == {"a": pytest.approx(0.004)}


def test_background_jobs_must_not_be_negative():
    with pytest.raises(ValueError, match="num_background_jobs=-1"):
        SharedHost(EventLoop(), 2, -1)
