#!/usr/bin/env bash
# Several steps in one device call, each with its own time limit, every result kept: the device
# tool returns at most 8 files a call and nothing of a call that runs past its limit, so each step
# writes into its own folder and the whole lot comes back as one archive, whatever failed.
#
#   bash benchmarks/gpu_run.sh bash benchmarks/gpu_batch.sh PLAN
#
# PLAN: a file, one step a line, "SECONDS COMMAND" (blank lines and # comments skipped). A step
# runs with $STEP_OUT set to its folder (benchmarks write their files there, e.g. --out
# "$STEP_OUT"); its stdout and stderr go to that folder's log. A step that would start with less
# than its SECONDS left of BATCH_DEADLINE_S (default 540, counted from this script's start) is
# skipped, so the archive is always written before the call's limit.
# In $OUT: summary.txt (each step's exit status, time and last lines) and results.tar.gz.
set -uo pipefail
plan=${1:?usage: gpu_batch.sh PLAN}
out=${OUT:?OUT must name the folder that comes back}
deadline=${BATCH_DEADLINE_S:-540}
start=$SECONDS
work=$(mktemp -d)
summary="$out/summary.txt"
: > "$summary"
step=0
while IFS= read -r line || [ -n "$line" ]; do
    [[ -z "${line// }" || "$line" =~ ^[[:space:]]*# ]] && continue
    limit=${line%% *}
    command=${line#* }
    step=$((step + 1))
    dir="$work/step$(printf %02d "$step")"
    mkdir -p "$dir"
    if (( SECONDS - start + limit > deadline )); then
        printf '## step %d: skipped (would pass %d s): %s\n\n' "$step" "$deadline" "$command" >> "$summary"
        continue
    fi
    began=$SECONDS
    STEP_OUT="$dir" timeout --kill-after=10 "$limit" bash -c "$command" > "$dir/log.txt" 2>&1
    rc=$?
    {
        printf '## step %d: rc %d after %d s: %s\n' "$step" "$rc" $((SECONDS - began)) "$command"
        tail -n 25 "$dir/log.txt"
        echo
    } >> "$summary"
done < "$plan"
tar czf "$out/results.tar.gz" -C "$work" .
rm -rf "$work"
