"""`llmesh` command line: one module per subcommand under services/cli/.

Each subcommand module defines:
    HELP: str                         one-line description for `llmesh --help`
    add_arguments(parser) -> None     its flags
    run(args) -> int                  the exit code
Modules are imported lazily so `llmesh status` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.common.config import ConfigError

# subcommand name -> module under services.cli
SUBCOMMANDS: dict[str, str] = {
    "up": "up",
    "test": "test",
    "generate": "generate",
    "status": "status",
    "bench": "bench",
    "calibrate": "calibrate",
    "simulate": "simulate",
    "migrate": "migrate",
    "drain": "drain",
    "drop": "drop",
    "restore": "restore",
    "health": "health",
    "certs": "certs",
}


def _available() -> dict[str, object]:
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"services.cli.{module_name}")
        except ModuleNotFoundError as exc:
            # Only hide subcommands whose module does not exist yet; a missing
            # dependency inside an existing module is a real error.
            if exc.name != f"services.cli.{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmesh", description="llmesh LLM serving mesh")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _available().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `test` and `bench` pass everything after them through untouched.
    if argv and argv[0] in ("test", "bench") and argv[0] in _available():
        module = importlib.import_module(f"services.cli.{argv[0]}")
        return module.run_passthrough(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:  # e.g. no cluster secret for an operator command
        print(f"llmesh {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
