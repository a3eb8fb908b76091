"""`llmesh drop`, `llmesh restore` and the groups in `llmesh status`, against the real
scheduler servicer and a fake stage-0 worker running on a loop in another thread."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import grpc
import pytest

from services.cli.main import main
from services.common.messages import LoadReport
from services.policies import make_instance_load
from tests.unit.scheduler.fake_worker import scheduler_and_worker


class MeshThread:
    """The in-process scheduler + fake worker, served from a loop in its own thread so
    the (blocking) CLI can call it from the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._context = scheduler_and_worker()
        self.mesh = self.call(self._context.__aenter__())

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def close(self) -> None:
        self.call(self._context.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def report(self, instance_id: str, seq: int, group_id: str, stage: int, layers, freed=0):
        """A load report as a group member sends it, taken in on the mesh's loop."""
        load = make_instance_load(
            instance_id,
            num_total_blocks=330 if stage == 0 else 0,
            num_used_blocks=0,
            num_running=0,
            group_id=group_id,
            group_stage=stage,
        )

        async def take() -> None:
            servicer = self.mesh.servicer
            assert servicer.registry.report(
                LoadReport(
                    load, seq, layer_start=layers[0], layer_end=layers[1], freed_weight_bytes=freed
                )  # fmt: skip
            )
            servicer.groups.observe(instance_id)

        self.call(take())


@pytest.fixture
def mesh():
    thread = MeshThread()
    yield thread
    thread.close()


def cli(*argv: str, mesh: MeshThread) -> int:
    return main([*argv, "--scheduler", mesh.mesh.scheduler_address])


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def printed(capsys) -> list[str]:
    """What the CLI printed, without the in-process servers' log lines."""
    return [line for line in capsys.readouterr().out.splitlines() if not LOG_LINE.match(line)]


def test_drop_prints_the_group_and_restore_its_figures(mesh, capsys):
    mesh.call(mesh.mesh.register("a", "b"))
    assert cli("drop", "--workers", "b, a", mesh=mesh) == 0
    worker = mesh.mesh.worker_address
    assert printed(capsys) == [
        "group-0: serving, 2 stages, dropped in 12.5 ms",
        f"  stage 0  b  layers [0, 2)  {worker}",
        f"  stage 1  a  layers [2, 4)  {worker}",
        "  KV: 330 blocks (5280 tokens) as a group vs 200 (3200 tokens) before, 1.65x",
        "  weights freed: 6.0 MiB",
    ]
    assert cli("restore", "--group", "group-0", mesh=mesh) == 0
    assert printed(capsys) == [
        "group-0: restored in 40.2 ms; 3 requests moved to another member, 1 preempted (recompute)"
    ]
    assert [r.group_id for r in mesh.mesh.worker.dissolve_requests] == ["group-0"]


def test_drop_and_restore_as_json(mesh, capsys):
    mesh.call(mesh.mesh.register("a", "b", "c", "d", num_layers=8, layer_end=8))
    assert cli("drop", "--workers", "a,b,c,d", "--json", mesh=mesh) == 0
    reply = json.loads(*printed(capsys))
    assert reply["drop_ms"] == 12.5
    group = reply["group"]
    assert [(m["instance_id"], m["stage"], m["layer_start"], m["layer_end"]) for m in group["members"]] == [
        ("a", 0, 0, 2), ("b", 1, 2, 4), ("c", 2, 4, 6), ("d", 3, 6, 8),
    ]  # fmt: skip
    assert {k: v for k, v in group.items() if k != "members"} == {
        "group_id": "group-0",
        "status": "serving",
        "num_group_blocks": 330,
        "num_blocks_before": 200,
        "block_size": 16,
        "freed_weight_bytes": 6 * 2**20,
    }
    assert cli("restore", "--group", "group-0", "--json", mesh=mesh) == 0
    assert json.loads(*printed(capsys)) == {
        "group_id": "group-0",
        "num_requests_moved": 3,
        "num_preempted": 1,
        "restore_ms": 40.25,
    }


def test_status_shows_layer_ranges_groups_and_stages(mesh, capsys, monkeypatch):
    mesh.call(mesh.mesh.register("a", "b", "c"))
    assert cli("drop", "--workers", "a,b", mesh=mesh) == 0
    capsys.readouterr()
    mesh.report("a", 1, "group-0", 0, (0, 2), freed=100)
    mesh.report("b", 1, "group-0", 1, (2, 4), freed=200)
    assert cli("status", "--json", mesh=mesh) == 0
    status = json.loads(*printed(capsys))
    assert [
        (i["instance_id"], i["layer_start"], i["layer_end"], i["group_id"], i["group_stage"], i["freed_weight_bytes"])
        for i in status["instances"]
    ] == [("a", 0, 2, "group-0", 0, 100), ("b", 2, 4, "group-0", 1, 200), ("c", 0, 4, "", 0, 0)]  # fmt: skip
    assert [(g["group_id"], g["status"]) for g in status["groups"]] == [("group-0", "serving")]
    monkeypatch.setenv("COLUMNS", "240")
    assert cli("status", mesh=mesh) == 0
    lines = [line.strip() for line in printed(capsys)]
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in ("a ", "b ", "c ")}
    assert (rows["a"][-3:-1], rows["b"][-3:-1], rows["c"][-3:-1]) == (
        ["[0,2)", "group-0/0"],
        ["[2,4)", "group-0/1"],
        ["[0,4)", "-"],
    )
    assert "KunServe groups" in lines
    (group_line,) = [line for line in lines if line.startswith("group-0")]
    assert group_line.split()[:4] == ["group-0", "serving", "a[0,2)", "b[2,4)"]
    assert "330 blocks (5280 tokens) as a group vs 200 (3200 tokens) before, 1.65x" in group_line


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        ("a", "--workers needs 2 or more instance ids separated by commas, got 'a'"),
        ("a,,b", "--workers needs 2 or more instance ids separated by commas, got 'a,,b'"),
        ("a,b,a", "--workers lists 'a' twice"),
    ],
)
def test_drop_refuses_bad_workers_before_calling_the_scheduler(workers, message, capsys):
    assert main(["drop", "--workers", workers, "--scheduler", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == f"llmesh drop: {message}\n"


def test_drop_and_restore_report_the_schedulers_refusals(mesh, capsys):
    mesh.call(mesh.mesh.register("a", "b"))
    assert cli("drop", "--workers", "a,ghost", mesh=mesh) == 2
    assert capsys.readouterr().err == "llmesh drop: NOT_FOUND: instance 'ghost' is not registered\n"
    mesh.mesh.worker.error = (grpc.StatusCode.FAILED_PRECONDITION, "member 'b' refused")
    assert cli("drop", "--workers", "a,b", mesh=mesh) == 1
    assert capsys.readouterr().err == (
        f"llmesh drop: FAILED_PRECONDITION: Worker.FormGroup on stage 0 'a' at "
        f"{mesh.mesh.worker_address} refused: FAILED_PRECONDITION: member 'b' refused\n"
    )
    assert cli("restore", "--group", "group-9", mesh=mesh) == 2
    assert capsys.readouterr().err == (
        "llmesh restore: NOT_FOUND: group 'group-9' does not exist; known: []\n"
    )
    assert cli("restore", "--group", " ", mesh=mesh) == 2
    assert capsys.readouterr().err == (
        "llmesh restore: --group must name a group (llmesh status lists them)\n"
    )


def test_the_flags_are_required(capsys):
    for argv, flag in ((["drop"], "--workers"), (["restore"], "--group")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert f"the following arguments are required: {flag}" in capsys.readouterr().err
