"""The ``lgvq`` command.

    lgvq plugins            every plugin, its version, its hooks and what it registered
    lgvq list [KIND] [GLOB] registered component names
    lgvq configs            the bundled gin files
    lgvq run --gin F ...    same as ``python -m lgvq_plugins.run``
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lgvq_plugins import registry
from lgvq_plugins.config import bundled_configs
from lgvq_plugins.plugins import plugin_infos
from lgvq_plugins.registry import KINDS


def _print_plugins() -> None:
    for info in plugin_infos():
        origin = "built-in" if info.builtin else (info.distribution or "in code")
        version = f" {info.version}" if info.version else ""
        print(f"{info.name} ({origin}{version})")
        if info.error:
            print(f"  FAILED: {info.error}")
        if info.hooks:
            print(f"  hooks: {', '.join(info.hooks)}")
        for kind, names in sorted(info.registered.items()):
            print(f"  {kind}: {', '.join(sorted(names))}")


def _print_components(kind: str | None, pattern: str | None) -> None:
    for k in ([kind] if kind else KINDS):
        names = registry(k).names(pattern)
        print(f"{k}: {', '.join(names) if names else '-'}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lgvq", description="lgvq-plugins command line",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list plugins with their versions and registrations")
    lister = sub.add_parser("list", help="list registered components")
    lister.add_argument("kind", nargs="?", choices=KINDS)
    lister.add_argument("pattern", nargs="?", help="glob, e.g. 'vq*'")
    sub.add_parser("configs", help="list the bundled gin files")
    sub.add_parser("run", help="train/evaluate an experiment (see python -m lgvq_plugins.run -h)",
                   add_help=False)
    if argv and argv[0] == "run":
        from lgvq_plugins.run import main as run_main

        run_main(argv[1:])
        return 0
    args = parser.parse_args(argv)
    if args.command == "plugins":
        _print_plugins()
    elif args.command == "list":
        _print_components(args.kind, args.pattern)
    elif args.command == "configs":
        print("\n".join(bundled_configs()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
