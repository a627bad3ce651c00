#!/usr/bin/env bash
# Run a command in another tree of this project (an A/B of two commits in one device call), then
# put this checkout back as the installed sglang-core. Make the tree here first (untracked folders
# travel with a device call):  git archive COMMIT --prefix=ab/NAME/ | tar x
#
#   bash benchmarks/in_tree.sh ab/NAME python3 benchmarks/gpu_llama8b.py --runs decode1 --out "$STEP_OUT/a.jsonl"
set -uo pipefail
tree=${1:?usage: in_tree.sh TREE COMMAND...}
shift
here=$PWD
install() { python3 -m pip install -q --no-index --no-deps --no-build-isolation -e "$1"; }
install "$tree" || exit 1
(cd "$tree" && "$@")
rc=$?
install "$here" || exit 1
exit $rc
