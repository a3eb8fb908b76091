"""The README's layout block names exactly the tree's top-level folders and services."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> set[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    paths = {m.group(1).rstrip("/") for m in re.finditer(r"^(\S+/)\s", block, re.M)}
    # A nested entry outside services/ (e.g. deploy/compose/) stands for its top folder.
    return {p if p.startswith("services/") else p.split("/")[0] for p in paths}


def _tree_paths() -> set[str]:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    folders = {p.split("/")[0] for p in tracked if "/" in p and not p.startswith(".")}
    services = {
        "/".join(p.split("/")[:2])
        for p in tracked
        if p.startswith("services/") and p.count("/") > 1
    }
    return (folders - {"services"}) | services


def test_readme_layout_matches_the_tree() -> None:
    assert _layout_paths() == _tree_paths()
