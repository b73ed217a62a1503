"""Apply the hand-made mutants named in docs/testing.md one at a time and run their tests.

    python scripts/named_mutants.py              # all of them
    python scripts/named_mutants.py ema-decay-swap search-ties-later-tile   # some, by name
    python scripts/named_mutants.py --list

Each mutant is an exact text replacement in one source file (the old text must occur exactly
once, so a refactor that moves the code makes the mutant fail loudly instead of testing
nothing) plus the tests that must kill it. The mutants are applied in a scratch copy of the
working tree (``$MUTATION_DIR``, default ``/tmp/lgvq-named-mutants``), never in the checkout,
with ``lgvq_plugins`` imported from the copy. A mutant is *killed* when its tests fail, and
*survived* when they pass; the script first checks that the unmutated copy passes the same
tests, so a failure is the mutant's doing. Exit status 1 if any mutant survived.

This complements ``scripts/mutation.sh`` (mutmut over whole modules): these are the mutants
a mutation review of the core found surviving, kept as a regression list.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, run with -x


MUTANTS: tuple[Mutant, ...] = (
    Mutant("ema-decay-swap", "backbones/vq.py",
           "keep = self.ema_decay\n", "keep = 1.0 - self.ema_decay\n",
           ("tests/test_quantizers.py::test_ema_decay_weighs_the_old_average",)),
    Mutant("search-ties-later-tile", "backbones/quant_search.py",
           "better = vals < best[n0:n1]", "better = vals <= best[n0:n1]",
           ("tests/test_quantizers.py::test_search_takes_the_first_index_on_exact_ties",)),
    Mutant("search-code-ties-later-rows", "backbones/quant_search.py",
           "better = cvals > code_score[k0:k1]", "better = cvals >= code_score[k0:k1]",
           ("tests/test_quantizers.py::test_search_takes_the_first_index_on_exact_ties",)),
    Mutant("search-code-ties-last-row", "backbones/quant_search.py",
           "cargs = torch.where(tile == cvals, row_ids, n1 - n0).amin(dim=0).long()",
           "cargs = torch.where(tile == cvals, row_ids, -1).amax(dim=0).long()",
           ("tests/test_quantizers.py::test_search_takes_the_first_index_on_exact_ties",)),
    Mutant("cvq-probrandom-cosine-temperature", "backbones/cvq.py",
           'scale = 0.5 if self.distance == "cosine" else 1.0',
           'scale = 1.0 if self.distance == "cosine" else 1.0',
           ("tests/test_quantizers.py::test_cvq_probrandom_draws_anchors_with_the_documented_temperature",)),
    Mutant("cvq-probrandom-l2-temperature", "backbones/cvq.py",
           'scale = 0.5 if self.distance == "cosine" else 1.0',
           'scale = 0.5 if self.distance == "cosine" else 0.5',
           ("tests/test_quantizers.py::test_cvq_probrandom_draws_anchors_with_the_documented_temperature",)),
    Mutant("cvq-probrandom-unseeded", "backbones/cvq.py",
           "gen.manual_seed(self.seed * 1_000_003 + offset)", "gen.seed()",
           ("tests/test_quantizers.py::test_cvq_probrandom_draws_anchors_with_the_documented_temperature",)),
    Mutant("bf16-autocast-never-on", "lgvq_plugins/training/trainer.py",
           'if self.precision == "bf16":\n', 'if False:\n',
           ("tests/test_trainer.py::test_bf16_autocast_on_cpu_trains",)),
    Mutant("codebook-report-self-compare", "lgvq_plugins/training/trainer_eval.py",
           "gathered = D.all_gather_cat(codebook[None])", "gathered = codebook[None]",
           ("tests/test_trainer.py::test_codebook_report_single_process",)),
    Mutant("codebook-report-always-identical", "lgvq_plugins/training/trainer_eval.py",
           '"codebooks_identical": len(set(fingerprints)) == 1', '"codebooks_identical": True',
           ("tests/test_trainer.py::test_codebook_report_single_process",)),
)


def make_copy(work: Path) -> None:
    """Fresh copy of the working tree (tracked + untracked, not ignored) whose package is
    complete, so nothing imports from the editable install's folders."""
    if work.exists():
        if any(work.iterdir()) and not (work / ".lgvq-mutation-dir").exists():
            sys.exit(f"{work} exists and was not made by this script; set MUTATION_DIR to a new folder")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / ".lgvq-mutation-dir").touch()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    for link, target in (("backbones", "../backbones"), ("tasks", "../tasks"), ("configs", "../gin")):
        (work / "lgvq_plugins" / link).symlink_to(target)


def run_tests(work: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    env = dict(os.environ, PYTHONPATH=f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=work, env=env, capture_output=True, text=True, check=False)
    return proc.returncode == 0, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:40s} {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; choose from {sorted(known)}")
    chosen = [known[n] for n in args.names] or list(MUTANTS)

    work = Path(os.environ.get("MUTATION_DIR", Path(tempfile.gettempdir()) / "lgvq-named-mutants"))
    make_copy(work)
    check = subprocess.run([sys.executable, "-c", "import lgvq_plugins.backbones.vq as m; print(m.__file__)"],
                           cwd=work, capture_output=True, text=True, check=False,
                           env=dict(os.environ, PYTHONPATH=str(work))).stdout.strip()
    if not check.startswith(str(work)):
        sys.exit(f"the copy does not import from itself ({check!r}); is the package installed editable?")

    all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    ok, seconds = run_tests(work, all_tests)
    if not ok:
        sys.exit(f"the unmutated copy fails {' '.join(all_tests)}: fix that first")
    print(f"baseline: {len(all_tests)} test target(s) pass unmutated ({seconds:.0f} s)\n")
    print("| mutant | file | change | result |\n|---|---|---|---|")
    survived = 0
    for m in chosen:
        target = work / m.path
        original = target.read_text()
        count = original.count(m.old)
        if count != 1:
            print(f"| {m.name} | {m.path} | text occurs {count} times | STALE: update the mutant |")
            survived += 1
            continue
        target.write_text(original.replace(m.old, m.new))
        try:
            passed, seconds = run_tests(work, m.tests)
        finally:
            target.write_text(original)
        survived += passed
        print(f"| {m.name} | {m.path} | `{m.old.strip()}` → `{m.new.strip()}` | "
              f"{'SURVIVED' if passed else 'killed'} by {', '.join(t.split('::')[-1] for t in m.tests)} "
              f"({seconds:.0f} s) |", flush=True)
    print(f"\n{len(chosen) - survived}/{len(chosen)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
