"""`vlm-tools` command line: `methods`, `demo`, and the verbs other modules add (setup, eval, registers, ...)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add sub-commands through `register_cli(subparsers)`; each imports its heavy deps lazily.
CLI_MODULES: tuple[str, ...] = (
    "vlm_tools.assets.cli",
    "vlm_tools.demo.cli",
    "vlm_tools.analysis.cli",
    "vlm_tools.interpret.cli",
    "vlm_tools.interpret.reliability_cli",
    "vlm_tools.interpret.points_cli",
    "vlm_tools.interpret.eval_cli",
    "vlm_tools.integrations.eval_cli",
    "vlm_tools.registers.cli",
)


def _cmd_methods(args: argparse.Namespace) -> int:
    from vlm_tools._registry import EXPLAIN, list_methods

    methods = list_methods(kind=args.kind)
    if args.kind is None:  # wrap methods, then attribution methods (`vlm_tools.explain`)
        methods = methods + list_methods(EXPLAIN)
    width = max(len(m.name) for m in methods)
    for m in methods:
        print(f"{m.name:<{width}}  {m.kind:<9}  {m.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the registered methods with one-line descriptions")
    p.add_argument("--kind", choices=["vision", "projector", "llm", "modifier", "explain"], default=None)
    p.set_defaults(func=_cmd_methods)
    for mod in CLI_MODULES:
        importlib.import_module(mod).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlm_tools.errors import OutputDirError, UsageError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, OutputDirError) as exc:
        print(f"vlm-tools {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
