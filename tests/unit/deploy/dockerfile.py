"""A Dockerfile as (instruction, arguments) per stage: what the static checks read.

Enough of the syntax for ours: comments, `\\` continuations, ARG defaults substituted
into FROM, exec-form (JSON) and shell-form arguments.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DOCKER_DIR = Path(__file__).resolve().parents[3] / "deploy" / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(path: Path) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, rest in instructions(path):
        if keyword == "ARG" and not result:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = re.split(r"\s+AS\s+", rest, flags=re.I)
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            result.append(Stage(image, parts[1] if len(parts) > 1 else ""))
        else:
            result[-1].instructions.append((keyword, rest))
    return args, result


def exec_form(arguments: str) -> list[str]:
    """A JSON-array argument (`["a", "b"]`); raises ValueError for the shell form."""
    value = json.loads(arguments)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not an exec form: {arguments}")
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    """The HEALTHCHECK's CMD (exec form), options stripped."""
    spec = stage.last("HEALTHCHECK")
    assert spec is not None
    return exec_form(spec.split("CMD", 1)[1].strip())


def env_defaults(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of the stage (the last one of each key wins)."""
    env = {}
    for spec in stage.all("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", spec):
            env[key] = value
    return env
