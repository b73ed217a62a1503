"""The ``lgvq`` command.

    lgvq plugins            every plugin, its version, its hooks and what it registered
    lgvq list [KIND] [GLOB] registered component names
    lgvq configs            the bundled gin files
    lgvq run --gin F ...    same as ``python -m lgvq_plugins.run``
    lgvq eval --pretrained runs/NAME/pretrained [--gin F ...]
                            evaluate a saved model: runs/NAME/eval/{metrics.json,report.html}
    lgvq compare --gin compare/F.gin
                            train variants x seeds, evaluate alike, write a mean ± std table
    lgvq cache-text --gin F [--cache-dir D]
                            encode every caption of the data set once into the feature cache

Each subcommand is one :class:`Subcommand` in :data:`SUBCOMMANDS`: a name, a help line, a
function adding its arguments and a function running it. Add one with
:func:`add_subcommand`; ``main`` needs no change.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from lgvq_plugins.api import registry
from lgvq_plugins.config import bundled_configs
from lgvq_plugins.plugins import get_host, plugin_infos
from lgvq_plugins.registry import KINDS, Origin


@dataclass(frozen=True)
class Subcommand:
    """One ``lgvq <name>`` subcommand."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]  # returns the exit status
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    #: hand the rest of the command line to ``run`` untouched, as ``args.argv`` (for
    #: subcommands with a parser of their own, e.g. ``lgvq run``)
    passthrough: bool = False


SUBCOMMANDS: dict[str, Subcommand] = {}


def add_subcommand(command: Subcommand) -> Subcommand:
    """Register ``command`` (a later one of the same name replaces it)."""
    SUBCOMMANDS[command.name] = command
    return command


# -- plugins ----------------------------------------------------------------------------


def _plugins(args: argparse.Namespace) -> int:
    host = get_host()
    for info in plugin_infos():
        origin = "built-in" if info.builtin else (info.distribution or "in code")
        version = f" {info.version}" if info.version else ""
        print(f"{info.name} ({origin}{version})")
        if info.error:
            print(f"  FAILED: {info.error}")
        if info.hooks:
            print(f"  hooks: {', '.join(info.hooks)}")
        for kind, names in sorted(info.registered.items()):
            print(f"  {kind}: {', '.join(_annotate(host, kind, n, info.name) for n in sorted(names))}")
    return 0


def _annotate(host, kind: str, name: str, owner: str) -> str:
    """``vq``, or ``vq (replaced by ...)`` when another registration of it is in effect."""
    reg = host.registries[kind]
    if name not in reg:
        return name
    active = reg.entry(name)
    mine = active.origin == Origin.CODE if owner == "<registered in code>" else active.owner == owner
    return name if mine else f"{name} (replaced by {active.source})"


add_subcommand(Subcommand("plugins", "list plugins with their versions and registrations", _plugins))


# -- list -------------------------------------------------------------------------------


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", nargs="?", choices=KINDS)
    parser.add_argument("pattern", nargs="?", help="glob, e.g. 'vq*'")


def _list(args: argparse.Namespace) -> int:
    for kind in ([args.kind] if args.kind else KINDS):
        names = registry(kind).names(args.pattern)
        print(f"{kind}: {', '.join(names) if names else '-'}")
    return 0


add_subcommand(Subcommand("list", "list registered components", _list, _list_arguments))


# -- configs ----------------------------------------------------------------------------


def _configs(args: argparse.Namespace) -> int:
    print("\n".join(bundled_configs()))
    return 0


add_subcommand(Subcommand("configs", "list the bundled gin files", _configs))


# -- run --------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from lgvq_plugins.run import main as run_main  # imported late: it pulls in torch

    run_main(args.argv)
    return 0


add_subcommand(Subcommand("run", "train/evaluate an experiment (see python -m lgvq_plugins.run -h)",
                          _run, passthrough=True))


# -- eval and compare -------------------------------------------------------------------


def _gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], metavar="BINDING",
                        help="gin binding applied after the files (repeatable)")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "example: lgvq eval --pretrained runs/cvq_lg/pretrained --gin eval/shapes_eval.gin"
    parser.add_argument("--pretrained", required=True, help="a run's pretrained/ folder")
    parser.add_argument("--out", default=None, help="evaluation folder (default: eval/ beside pretrained/)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (overrides Evaluation.tasks)")
    parser.add_argument("--no-run-config", action="store_true",
                        help="do not read the run's config.gin (it sizes the data as in training)")
    _gin_arguments(parser)


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lgvq_plugins.config import parse_gin

    run_config = Path(args.pretrained).resolve().parent / "config.gin"
    files = ([str(run_config)] if run_config.is_file() and not args.no_run_config else []) + args.gin
    parse_gin(files, args.gin_bindings)
    from lgvq_plugins.evaluation.evaluate import evaluate_pretrained

    extra = {"tasks": [t for t in args.tasks.split(",") if t]} if args.tasks is not None else {}
    metrics = evaluate_pretrained(args.pretrained, args.out, **extra)
    print(json.dumps(metrics["tasks"], indent=2, sort_keys=True))
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "example: lgvq compare --gin compare/cvq_compare.gin --gin_bindings 'Comparison.seeds = [0]'"
    parser.add_argument("--root", default=None, help="folder of comparisons (overrides Comparison.root)")
    parser.add_argument("--name", default=None, help="comparison name (overrides Comparison.name)")
    _gin_arguments(parser)


def _compare(args: argparse.Namespace) -> int:
    from lgvq_plugins.config import parse_gin

    if not args.gin:
        raise SystemExit("lgvq compare: give the comparison's gin file, e.g. --gin compare/cvq_compare.gin")
    parse_gin(args.gin, args.gin_bindings)
    from lgvq_plugins.evaluation.compare import Comparison

    overrides = {k: v for k, v in {"root": args.root, "name": args.name}.items() if v is not None}
    comparison = Comparison(**overrides)
    summary = comparison.run()
    print((comparison.out_dir / "comparison.md").read_text(encoding="utf-8"))
    print(f"[compare] {comparison.out_dir}/report.html ({summary['status']})")
    return 0


add_subcommand(Subcommand("eval", "evaluate a saved model (metrics.json + report.html)", _eval, _eval_arguments))
add_subcommand(Subcommand("compare", "train variants x seeds and tabulate their evaluation", _compare,
                          _compare_arguments))


# -- cache-text (data/caption_features.py) -----------------------------------------------


def _cache_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example: lgvq cache-text --gin paper/cub200_cvq_lg.gin --gin_bindings "
                     "\"cub200.root = '/data/cub'\" --cache-dir /data/cub/text_cache")
    _gin_arguments(parser)
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default: train,val)")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per encoder call")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: LanguageGuided.cache_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cache_text(args: argparse.Namespace) -> int:
    import json

    from lgvq_plugins.config import parse_gin

    if not args.gin:
        raise SystemExit("lgvq cache-text: give the run's gin file(s), e.g. --gin paper/cub200_cvq_lg.gin")
    parse_gin(args.gin, args.gin_bindings)
    from lgvq_plugins.data.caption_features import cache_text

    report = cache_text([s for s in args.splits.split(",") if s], batch_size=args.batch_size,
                        cache_dir=args.cache_dir, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0


add_subcommand(Subcommand("cache-text", "encode every caption of a data set into the text-feature cache",
                          _cache_text, _cache_text_arguments))


# -- main -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgvq", description="lgvq-plugins command line",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, add_help=not command.passthrough)
        if command.arguments is not None:
            command.arguments(child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    if command is not None and command.passthrough:
        return command.run(argparse.Namespace(command=command.name, argv=argv[1:]))
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
