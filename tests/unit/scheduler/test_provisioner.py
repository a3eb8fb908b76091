"""The local-process provisioner with real worker processes that fail to start."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.common.config import ConfigError
from services.scheduler.provisioner import LocalProcessProvisioner, make_provisioner


async def test_a_worker_that_dies_before_registering_is_no_longer_pending(tmp_path):
    provisioner = LocalProcessProvisioner(
        "127.0.0.1:1", model=str(tmp_path / "no-such-checkpoint"), log_dir=tmp_path
    )
    assert provisioner.start(2) == ["auto-0", "auto-1"]
    assert provisioner.owns("auto-0") and provisioner.owns("auto-1")
    assert provisioner.pending(registered=[]) == ["auto-0", "auto-1"]
    for _ in range(600):  # the workers exit: the checkpoint does not exist
        if not provisioner.pending(registered=[]):
            break
        await asyncio.sleep(0.1)
    assert provisioner.pending(registered=[]) == []
    assert not provisioner.owns("auto-0")
    assert "no-such-checkpoint" in (tmp_path / "auto-0.log").read_text()
    assert provisioner.start(1) == ["auto-2"]  # ids are never reused
    await provisioner.stop("auto-2")
    assert not provisioner.owns("auto-2")
    await provisioner.close()


async def test_a_registered_worker_is_not_pending_and_is_stopped_on_close(tmp_path):
    provisioner = LocalProcessProvisioner("127.0.0.1:1", log_dir=tmp_path, grace_s=5)
    [instance_id] = provisioner.start(1)
    pid = provisioner.pid(instance_id)
    assert provisioner.pending(registered=[instance_id]) == []
    assert provisioner.owns(instance_id)
    await provisioner.close()
    assert not provisioner.owns(instance_id)
    with pytest.raises(ProcessLookupError):  # exited and reaped
        os.kill(pid, 0)


def test_unknown_provisioner_is_named():
    with pytest.raises(ConfigError, match="provisioner 'k8s' is not one of"):
        make_provisioner("k8s", "127.0.0.1:1")
