#!/usr/bin/env bash
# Repeat every multi-process test (marked @pytest.mark.multiprocess) N times in each of K copies running side by
# side, then print the failures of each test. Plain `python -m pytest`, no plugins.
#
#   scripts/multiprocess_loop.sh [N] [K] [pytest arguments...]
#   scripts/multiprocess_loop.sh 20 2                      # the issue-18 check: 20 runs, a second copy beside
#   scripts/multiprocess_loop.sh 20 2 -k fsdp2             # one test
#   PYTHON=.venv/bin/python scripts/multiprocess_loop.sh 5 4
#
# Exit status 0 when no run failed. Each run gets its own --basetemp, so the copies share no temporary files;
# the logs of failed runs stay in the printed directory.
set -u
N=${1:-20}
K=${2:-2}
shift $(($# < 2 ? $# : 2))
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
logs=$(mktemp -d "${TMPDIR:-/tmp}/multiprocess_loop.XXXXXX")

tests=$("$PYTHON" -m pytest -q --collect-only -m multiprocess "$@" 2>/dev/null | grep '::')
if [ -z "$tests" ]; then
    echo "no test marked multiprocess was selected" >&2
    exit 2
fi
echo "$(echo "$tests" | wc -l) multi-process tests, $N runs in each of $K parallel copies; logs in $logs"

for copy in $(seq "$K"); do
    (
        for run in $(seq "$N"); do
            log="$logs/copy$copy-run$run.log"
            "$PYTHON" -m pytest -q -rfE -m multiprocess --basetemp="$logs/tmp-$copy-$run" "$@" >"$log" 2>&1
            rc=$?
            rm -rf "$logs/tmp-$copy-$run"
            # Keep only the logs of runs that failed. A pytest that dies (a signal, an abort at exit) names no
            # failed test: it is counted from its exit status.
            if grep -qE '^(FAILED|ERROR) ' "$log"; then
                echo "copy $copy run $run: $(grep -cE '^(FAILED|ERROR) ' "$log") failed"
            elif [ "$rc" -ne 0 ]; then
                echo "copy $copy run $run: pytest exited with status $rc and named no failed test"
                echo "$rc" >"$logs/copy$copy-run$run.crashed"
            else
                rm -f "$log"
            fi
        done
    ) &
done
wait

failures=$(cat "$logs"/*.log 2>/dev/null | grep -E '^(FAILED|ERROR) ' | sed -E 's/^(FAILED|ERROR) //; s/ - .*//')
total=0
printf '%-100s %s\n' "test" "failed/runs"
while read -r test; do
    # The summary names a test relative to where pytest ran, the collection relative to its rootdir: match the end.
    count=$(printf '%s\n' "$failures" | awk -v t="$test" '{
        start = length($0) - length(t)
        if (start >= 0 && substr($0, start + 1) == t && (start == 0 || substr($0, start, 1) == "/")) n++
    } END { print n + 0 }')
    total=$((total + count))
    printf '%-100s %d/%d\n' "$test" "$count" $((N * K))
done <<<"$tests"
crashed=$(find "$logs" -name '*.crashed' | wc -l)
echo "failed runs of a test, in all: $total; pytest runs that exited non-zero without naming a test: $crashed"
[ "$total" -eq 0 ] && [ "$crashed" -eq 0 ]
