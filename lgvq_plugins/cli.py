"""The ``lgvq`` command.

    lgvq plugins            every plugin, its version, its hooks and what it registered
    lgvq list [KIND] [GLOB] registered component names
    lgvq configs            the bundled gin files
    lgvq run --gin F ...    same as ``python -m lgvq_plugins.run``
    lgvq eval --pretrained runs/NAME/pretrained [--gin F ...]
                            evaluate a saved model: runs/NAME/eval/{metrics.json,report.html}
    lgvq compare --gin gin/compare/F.gin
                            train variants x seeds, evaluate alike, write a mean ± std table
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
    _add_eval_and_compare(sub)
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
    elif args.command in ("eval", "compare"):
        return _eval_or_compare(args)
    return 0


def _add_eval_and_compare(sub: argparse._SubParsersAction) -> None:
    def gin_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin file (repeatable)")
        p.add_argument("--gin_bindings", action="append", default=[], metavar="BINDING",
                       help="gin binding applied after the files (repeatable)")

    ev = sub.add_parser("eval", help="evaluate a saved model (metrics.json + report.html)",
                        epilog="example: lgvq eval --pretrained runs/cvq_lg/pretrained --gin eval/shapes.gin")
    ev.add_argument("--pretrained", required=True, help="a run's pretrained/ folder")
    ev.add_argument("--out", default=None, help="evaluation folder (default: eval/ beside pretrained/)")
    ev.add_argument("--tasks", default=None, help="comma-separated task names (overrides Evaluation.tasks)")
    ev.add_argument("--no-run-config", action="store_true",
                    help="do not read the run's config.gin (it sizes the data like the training did)")
    gin_args(ev)
    cmp = sub.add_parser("compare", help="train variants x seeds and tabulate their evaluation",
                         epilog="example: lgvq compare --gin compare/cvq.gin --gin_bindings 'Comparison.seeds = [0]'")
    cmp.add_argument("--root", default=None, help="folder of comparisons (overrides Comparison.root)")
    cmp.add_argument("--name", default=None, help="comparison name (overrides Comparison.name)")
    gin_args(cmp)


def _eval_or_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lgvq_plugins.config import parse_gin

    if args.command == "eval":
        run_config = Path(args.pretrained).resolve().parent / "config.gin"
        files = ([str(run_config)] if run_config.is_file() and not args.no_run_config else []) + args.gin
        parse_gin(files, args.gin_bindings)
        from lgvq_plugins.evaluation.evaluate import evaluate_pretrained

        extra = {"tasks": [t for t in args.tasks.split(",") if t]} if args.tasks is not None else {}
        metrics = evaluate_pretrained(args.pretrained, args.out, **extra)
        print(json.dumps(metrics["tasks"], indent=2, sort_keys=True))
        return 0
    if not args.gin:
        raise SystemExit("lgvq compare: give the comparison's gin file, e.g. --gin compare/cvq.gin")
    parse_gin(args.gin, args.gin_bindings)
    from lgvq_plugins.evaluation.compare import Comparison

    overrides = {k: v for k, v in {"root": args.root, "name": args.name}.items() if v is not None}
    comparison = Comparison(**overrides)
    summary = comparison.run()
    print((comparison.out_dir / "comparison.md").read_text(encoding="utf-8"))
    print(f"[compare] {comparison.out_dir}/report.html ({summary['status']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
