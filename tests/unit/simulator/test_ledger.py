"""The simulator's per-request books (services/simulator/ledger.py): tokens, finishes,
preemption loss, migrations, and the conservation check at the end."""

import math

import pytest

from services.simulator.ledger import RequestLedger
from services.simulator.result import SimulationError
from services.simulator.workload import SimRequest
from services.worker.engine.outputs import RequestOutput


def ledger() -> RequestLedger:
    return RequestLedger([SimRequest("a", 0.0, 10, 3), SimRequest("b", 0.5, 4, 1, priority=1)])


def test_outputs_set_first_token_finish_and_where_it_finished():
    books = ledger()
    books.note_outputs("i00", [RequestOutput("a", [7], 0, False, None)], now=1.0)
    books.note_outputs("i01", [RequestOutput("a", [8, 9], 1, True, "length")], now=2.5)
    a = books.records["a"]
    assert (a.first_token_s, a.finish_s, a.num_generated, a.num_finishes) == (1.0, 2.5, 3, 1)
    assert a.instance_id == "i01" and books.num_finished == 1
    assert books.records["b"].num_generated == 0 and math.isnan(books.records["b"].finish_s)


def test_a_preemption_costs_the_time_until_the_next_token():
    books = ledger()
    books.note_outputs("i00", [RequestOutput("a", [7], 0, False, None)], now=1.0)
    books.note_preempted(["a"], now=1.5)
    books.note_preempted(["a"], now=1.75)  # again before recovering: the loss counts from 1.5
    books.note_outputs("i00", [RequestOutput("a", [8], 1, False, None)], now=4.0)
    a = books.records["a"]
    assert (a.num_preemptions, a.preemption_loss_s) == (2, 2.5)
    assert math.isnan(a.preempted_at_s)


def test_conservation_needs_every_request_finished_once_with_all_its_tokens():
    books = ledger()
    books.note_migrated("b")
    books.note_outputs("i00", [RequestOutput("a", [1, 2, 3], 0, True, "length")], now=1.0)
    with pytest.raises(SimulationError, match="request b broke conservation"):
        books.conserved()
    books.note_outputs("i01", [RequestOutput("b", [4], 0, True, "length")], now=2.0)
    records = books.conserved()
    assert [(r.request_id, r.num_migrations, r.priority) for r in records] == [
        ("a", 0, 0),
        ("b", 1, 1),
    ]
