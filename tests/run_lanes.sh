#!/usr/bin/env bash
# `make test`: the suite in two lanes at once, one per core of a 2-core CI machine.
#
# The drill lane holds the fault drills that run real `mvtcae train` processes, `ray job submit`
# and a multi-node local cluster; they spend much of their time waiting (for Ray to notice a
# lost node, for a restart, for a deadline), which the other lane uses. Each lane is its own
# pytest process with its own temporary directory and its own dashboard port preference; its
# fixtures stop what they start by PID. Ctrl-C or SIGTERM reaches both lanes.
set -uo pipefail
bin=${1:-.venv/bin}
drills=(tests/cluster tests/training/test_shipped_faults.py tests/sweep/test_shipped_sweep_faults.py)
lane_log=$(mktemp -t mvtcae-drill-lane-XXXXXX)
lane_tmp=$(mktemp -d -t mvtcae-drill-lane-XXXXXX)

MVTCAE_DASHBOARD_PORT=8365 "$bin/pytest" -q --timeout=900 --durations=10 -p no:cacheprovider \
    --basetemp="$lane_tmp/t" "${drills[@]}" > "$lane_log" 2>&1 &
lane=$!
stop_lane() {
    kill -TERM "$lane" 2>/dev/null
    wait "$lane"
    cat "$lane_log"
    rm -rf "$lane_log" "$lane_tmp"
    exit 130
}
trap stop_lane INT TERM

ignored=()
for path in "${drills[@]}"; do ignored+=("--ignore=$path"); done
"$bin/pytest" -q --timeout=900 --durations=25 "${ignored[@]}"
rest=$?
wait "$lane"
drill=$?
echo
echo "==== the drill lane: ${drills[*]} ===="
cat "$lane_log"
rm -rf "$lane_log" "$lane_tmp"
echo "lanes: rest exit $rest, drills exit $drill"
exit $(( rest != 0 || drill != 0 ))
