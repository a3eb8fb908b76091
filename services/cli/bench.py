"""`llmesh bench NAME [ARGS...]`: run bench/NAME.py, which prints a JSON object last."""

from __future__ import annotations

import importlib
import pkgutil

import bench

HELP = "run a benchmark from bench/ (llmesh vs its baseline); last line is JSON"


def _names() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
    )


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=_names() or None, help="benchmark name")
    parser.add_argument("rest", nargs="*", help="arguments passed to the benchmark")


def run(args) -> int:
    return run_passthrough([args.name, *args.rest])


def run_passthrough(argv: list[str]) -> int:
    names = _names()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llmesh bench NAME [ARGS...]\n\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"llmesh bench: unknown benchmark {name!r}; choose from: {', '.join(names)}")
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)
