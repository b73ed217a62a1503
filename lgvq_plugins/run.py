"""Train and evaluate one experiment described by gin files.

    python -m lgvq_plugins.run --gin gin/cvq_lg.gin
    python -m lgvq_plugins.run --gin cvq_lg.gin --gin_bindings 'Trainer.max_steps = 100'
    torchrun --nproc_per_node 2 -m lgvq_plugins.run --gin gin/cvq_lg.gin

``config.gin`` (the files and bindings as given) is written into the run directory at the
start; ``operative_config.gin`` (every value actually used) once the model is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import gin

from lgvq_plugins.config import parse_gin

EPILOG = """examples:
  python -m lgvq_plugins.run --gin gin/cvq_lg.gin
  python -m lgvq_plugins.run --gin cvq_lg.gin --gin_bindings "Trainer.max_steps = 50"
  python -m lgvq_plugins.run --gin gin/vqgan.gin --gin gin/my_overrides.gin --name vqgan_try
  python -m lgvq_plugins.run --gin gin/cvq_lg.gin --resume      # continue runs/<name>
  torchrun --nproc_per_node 2 -m lgvq_plugins.run --gin gin/cvq_lg.gin
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lgvq_plugins.run", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin", action="append", default=[], metavar="FILE",
                        help="gin file (repeatable); a path, or the name of a bundled config")
    parser.add_argument("--gin_bindings", action="append", default=[], metavar="BINDING",
                        help="gin binding applied after the files (repeatable), e.g. 'Trainer.max_steps = 10'")
    parser.add_argument("--name", default=None, help="run name (overrides Experiment.name)")
    parser.add_argument("--root", default=None, help="folder holding run directories (overrides Experiment.root)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if not args.gin:
        build_parser().error("at least one --gin file is required (try --gin cvq_lg.gin)")
    files = parse_gin(args.gin, args.gin_bindings)

    from lgvq_plugins.training.experiment import Experiment  # imported late: it pulls in torch-heavy modules

    overrides = {k: v for k, v in {"name": args.name, "root": args.root}.items() if v is not None}
    experiment = Experiment(resume=args.resume, **overrides)  # absent flags leave gin's values
    experiment.write_config(files, args.gin_bindings)
    experiment.build()
    experiment.write_operative_config(gin.operative_config_str())
    try:
        metrics = experiment.run()
    except BaseException:
        _shutdown_distributed(synchronise=False)  # a peer may never reach a barrier now
        raise
    _shutdown_distributed()
    if experiment.is_main_process:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _shutdown_distributed(synchronise: bool = True) -> None:
    """Leave the process group cleanly: a rank that exits while a peer is still inside a
    gloo collective can abort the peer."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
