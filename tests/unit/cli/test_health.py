"""`llmesh health`: bad input is named, not a traceback; a dead address fails."""

from __future__ import annotations

import socket

from services.cli.health import main


def test_without_address_or_ready_file_it_says_what_to_give(capsys):
    assert main([]) == 1
    assert "give an ADDRESS or --ready-file" in capsys.readouterr().err


def test_an_unreadable_ready_file_is_named(tmp_path, capsys):
    ready = tmp_path / "ready.json"
    ready.write_text("{not json")
    assert main(["--ready-file", str(ready)]) == 1
    assert f"--ready-file {ready}: unreadable" in capsys.readouterr().err


def test_nobody_listening_fails_with_the_grpc_status(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main([f"127.0.0.1:{port}", "--timeout-s", "1"]) == 1
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{port}: no answer (UNAVAILABLE)"
