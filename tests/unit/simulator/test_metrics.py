import math

from services.simulator.metrics import RequestRecord, summarize


def record(request_id, arrival, first, finish, generated, preemptions=0, loss=0.0, migrations=0):
    r = RequestRecord(request_id, arrival, 0, 10, generated)
    r.first_token_s, r.finish_s, r.num_generated = first, finish, generated
    r.num_finishes = 1
    r.num_preemptions, r.preemption_loss_s, r.num_migrations = preemptions, loss, migrations
    return r


def test_per_request_latencies():
    r = record("a", arrival=1.0, first=1.5, finish=3.5, generated=5)
    assert (r.ttft_s, r.e2e_s, r.tpot_s) == (0.5, 2.5, 0.5)


def test_single_token_request_has_no_tpot():
    assert math.isnan(record("a", 0.0, 1.0, 1.0, 1).tpot_s)


def test_summary_means_percentiles_and_counts():
    records = [
        record("a", 0.0, 1.0, 2.0, 3),  # ttft 1, tpot 0.5, e2e 2
        record("b", 0.0, 2.0, 2.0, 1, preemptions=2, loss=0.6),  # ttft 2, no tpot, e2e 2
        record("c", 1.0, 4.0, 7.0, 4, migrations=1),  # ttft 3, tpot 1, e2e 6
        record("d", 0.0, 4.0, 4.0, 1),  # ttft 4, e2e 4
    ]
    s = summarize(records)
    assert (s.num_requests, s.mean_ttft_s, s.mean_tpot_s, s.mean_e2e_s) == (4, 2.5, 0.75, 3.5)
    # numpy linear interpolation: p99 of [1, 2, 3, 4] = 3 + 0.97
    assert math.isclose(s.p99_ttft_s, 3.97)
    assert math.isclose(s.p99_tpot_s, 0.995)
    assert math.isclose(s.p99_e2e_s, 5.94)
    assert (s.preemptions, s.preemption_loss_total_s, s.migrations) == (2, 0.6, 1)
    assert math.isclose(s.preemption_loss_s, 0.15)


def test_committed_migrations_override_the_per_request_count():
    assert summarize([record("a", 0, 1, 2, 3, migrations=1)], num_migrations=4).migrations == 4


def test_to_dict_rounds_and_turns_nan_into_none():
    d = summarize([record("a", 0.0, 1.0 / 3, 1.0, 1)]).to_dict()
    assert d["mean_ttft_s"] == 0.333333
    assert d["mean_tpot_s"] is None
    assert d["num_requests"] == 1


def test_empty_summary_is_nan_not_an_error():
    s = summarize([])
    assert s.num_requests == 0 and math.isnan(s.p99_ttft_s)
