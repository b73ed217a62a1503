#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 2.5 (see docs/testing.md).
#
#   scripts/mutation.sh                 # every group below (hours on a laptop)
#   scripts/mutation.sh search vq cvq   # one or more groups by name, one after the other
#   MUTATION_DIR=/tmp/mut-cvq scripts/mutation.sh cvq &   # groups in parallel: one scratch
#                                                         # copy (MUTATION_DIR) per process
#
# Why a copy: mutmut 2 rewrites the source file in place for every mutant. Running it in
# your checkout would hand half-mutated modules to anything else that imports the package
# meanwhile (an editor, a second test run). The script copies the working tree (tracked and
# untracked, not ignored files) to $MUTATION_DIR and makes `lgvq_plugins` — including the
# `backbones`/`tasks`/`configs` subpackages that the editable install maps to other folders —
# import from the copy. The mutmut cache stays in the copy, so a second run only re-tests
# the mutants that survived or were not tested yet (and all of them if the tests changed).
#
# Why mutmut 2.5 and not 3.x: mutmut 3 never mutates decorated functions, and the code
# that matters most here is decorated (`nearest_codes` and the EMA / usage / re-anchoring
# updates run under `@torch.no_grad()`). mutmut 2 mutates every line.
#
# Each group: the files it mutates, and the tests that guard them (kept to the relevant
# test files so one mutant costs one pytest start-up plus a few seconds).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${MUTATION_DIR:-${TMPDIR:-/tmp}/lgvq-mutation}"
python="${PYTHON:-python}"

declare -A FILES TESTS
FILES[search]="backbones/quant_search.py"
TESTS[search]="tests/test_quantizers.py"
FILES[vq]="backbones/vq.py,backbones/quant_base.py"
TESTS[vq]="tests/test_quantizers.py"
FILES[cvq]="backbones/cvq.py"
TESTS[cvq]="tests/test_quantizers.py"
FILES[losses]="lgvq_plugins/guidance/losses.py,lgvq_plugins/guidance/masking.py"
TESTS[losses]="tests/test_losses.py tests/test_guidance.py"
FILES[checkpoints]="lgvq_plugins/training/checkpoint.py,lgvq_plugins/training/trainer_resume.py"
TESTS[checkpoints]="tests/test_checkpoint.py tests/test_trainer.py"
FILES[cache]="lgvq_plugins/text/cache.py"
TESTS[cache]="tests/test_text_cache.py"
ORDER=(search vq cvq losses checkpoints cache)

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=("${ORDER[@]}")
for g in "${groups[@]}"; do
    [ -n "${FILES[$g]:-}" ] || { echo "unknown group '$g'; choose from: ${ORDER[*]}" >&2; exit 2; }
done
"$python" -c "import mutmut, sys; sys.exit(0 if mutmut.__version__.startswith('2.') else 1)" 2>/dev/null || {
    echo "needs mutmut 2.x: pip install 'mutmut>=2.5,<3' (mutmut 3 skips decorated functions)" >&2; exit 2; }

# Fresh copy of the working tree; keep only the mutmut caches (one per group) and results.
# The scratch folder is wiped below: refuse any folder this script did not create.
if [ -d "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -f "$work/.lgvq-mutation-dir" ]; then
    echo "$work exists and was not made by this script; set MUTATION_DIR to a new folder" >&2; exit 2
fi
mkdir -p "$work"
find "$work" -mindepth 1 -maxdepth 1 ! -name '.mutmut-cache*' ! -name 'mutation-results' ! -name 'mutation-results-server.log' ! -name .lgvq-mutation-dir -exec rm -rf {} +
touch "$work/.lgvq-mutation-dir"
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work"
# Make the copy's package complete, so imports never fall through to the editable install.
ln -sfn ../backbones "$work/lgvq_plugins/backbones"
ln -sfn ../tasks "$work/lgvq_plugins/tasks"
ln -sfn ../gin "$work/lgvq_plugins/configs"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
cd "$work"
"$python" - <<EOF
import lgvq_plugins.backbones.vq as vq, lgvq_plugins.training.checkpoint as ck
for m in (vq, ck):
    assert m.__file__.startswith("$work"), f"{m.__name__} imports from {m.__file__}, not the copy"
EOF

# One fork server for all test runs (scripts/mutation_runner.py): each mutant then costs its
# tests, not a fresh import of torch and friends.
sock="$work/.mutation-runner.sock"
"$python" scripts/mutation_runner.py serve "$sock" > mutation-results-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
# importing torch & co. can take minutes on a loaded machine: wait while the server lives
for _ in $(seq 1800); do [ -S "$sock" ] && break; kill -0 $server 2>/dev/null || break; sleep 1; done
[ -S "$sock" ] || { echo "the mutation runner did not start: see $work/mutation-results-server.log" >&2; exit 1; }

mkdir -p mutation-results
for g in "${groups[@]}"; do
    echo "== group $g: mutating ${FILES[$g]} against ${TESTS[$g]}"
    # mutmut keeps one cache per directory; park each group's cache under its own name.
    [ -f ".mutmut-cache-$g" ] && mv ".mutmut-cache-$g" .mutmut-cache || rm -f .mutmut-cache
    status=0
    # -m 5: a loaded machine must not turn slow runs into "timeouts"
    "$python" -m mutmut run --paths-to-mutate "${FILES[$g]}" --tests-dir tests/ --no-progress \
        --simple-output -m 5 \
        --runner "$python -S scripts/mutation_runner.py run $sock -- -x -q -p no:cacheprovider ${TESTS[$g]}" \
        || status=$?  # mutmut's exit code is a bit field of outcomes, not a failure
    "$python" -m mutmut results > "mutation-results/$g.txt" || true
    # every surviving, timed-out and suspicious mutant in full, for docs/testing.md
    : > "mutation-results/$g-survivors.diff"
    for kind in survived timeout suspicious; do
        for id in $("$python" -m mutmut result-ids "$kind" 2>/dev/null); do
            { echo "### $kind mutant $id"; "$python" -m mutmut show "$id"; echo; } >> "mutation-results/$g-survivors.diff"
        done
    done
    "$python" - "$g" <<'EOF2' | tee -a mutation-results/summary.txt
import sqlite3, sys
counts = dict(sqlite3.connect(".mutmut-cache").execute("select status, count(*) from mutant group by status"))
total, killed = sum(counts.values()), counts.get("ok_killed", 0)
print(f"{sys.argv[1]}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%); {counts}")
EOF2
    mv .mutmut-cache ".mutmut-cache-$g"
    echo "== group $g: mutmut exit status $status; results in $work/mutation-results/$g.txt"
    cat "mutation-results/$g.txt"
done
