#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool of a development session): install rlcm-fast and what
# the machine's image lacks, run check_claims.py within a budget, leave everything under $OUT.
#
#   bash benchmarks/lent_gpu.sh BUDGET_S STAGES COMMIT
#   e.g. bash benchmarks/lent_gpu.sh 590 train,rewards,tests 1a2b3c4   (device call: timeout_s 600)
# A session has 15 minutes of device time, the machine's start (a minute or two) included.
#
# BUDGET_S is the seconds this script may run, the install included (69 s and 80 s on the H200, building the
# extensions): check_claims' --budget-s is what the install leaves of it, less 25 s for a stage's stop, the
# judging and the packing. Give the device call a timeout_s of BUDGET_S + 10 or more: at 397294b a
# check_claims budget of 520 s after an 80 s install met timeout_s 600 and was killed before it wrote
# claims.md. STAGES is check_claims' --stages, COMMIT the commit the figures are of (the copy of the tree on
# that machine cannot tell it).
# Wheels: the image has torch, triton, transformers, peft, pybind11 and scikit-build-core, but neither
# diffusers nor the nvJPEG wheel, and no package index. Fetch them here, into the git-ignored .whl/:
#   pip download --no-deps -d .whl diffusers==0.42.1 nvidia-nvjpeg==13.0.4.44
# (the nvJPEG that ran on the H200, driver 580 = CUDA 13.0; a newer 13.x may want a newer driver), and
# pass carry [".whl"] to the device call. Writes $OUT/console.log (this script's output: versions,
# install, stage progress), $OUT/install.log (pip's; a failed install stops the script) and
# $OUT/results.tar.gz: results/, the benchmarks' JSON, check_claims.log and claims.md/json, packed on exit
# because the device tool returns at most 8 files (a run killed before its exit trap leaves results/ as it is).
set -uo pipefail
if [ $# -ne 3 ]; then
    echo "usage: bash benchmarks/lent_gpu.sh BUDGET_S STAGES COMMIT" >&2
    exit 2
fi
budget_s=$1 stages=$2 commit=$3
case $budget_s in
    '' | *[!0-9]*) echo "BUDGET_S '$budget_s' is invalid: it must be a whole number of seconds" >&2; exit 2 ;;
esac
out=${OUT:?OUT must name the folder whose files come back}
wheels=${WHEELS:-.whl}
cd "$(dirname "$0")/.."
started=$(date +%s)
exec > >(tee "$out/console.log") 2>&1
tee_pid=$!
pack_results() {
    if [ -d "$out/results" ] && tar -czf "$out/results.tar.gz" -C "$out" results; then
        rm -rf "$out/results"
        echo "results packed into $out/results.tar.gz"
    fi
}
# On exit, pack the results, then close tee's input and wait for it: bash does not wait for a process
# substitution, and the machine may take $OUT back before tee has written the last lines.
trap 'pack_results; exec >&- 2>&-; wait "$tee_pid"' EXIT

date
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available())"
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $wheels/: diffusers must already be installed (see the header of this script)"
elif ! python3 -m pip install --quiet --no-deps --no-index "$wheels"/*.whl; then
    echo "installing the wheels in $wheels/ failed"
    exit 1
fi
# Every stage imports diffusers: without it the call would spend its budget on import errors.
if ! python3 -c "import diffusers; print('diffusers', diffusers.__version__)"; then
    echo "diffusers does not import: carry its wheel (see the header of this script)"
    exit 1
fi
# --no-build-isolation: the build needs nothing the image lacks, and the machine has no package index.
python3 -m pip install --no-deps --no-build-isolation . > "$out/install.log" 2>&1
install_rc=$?
grep "Successfully installed" "$out/install.log"  # which extensions were built: check_claims says
echo "install rc=$install_rc after $(( $(date +%s) - started )) s"
if [ "$install_rc" -ne 0 ]; then  # nothing below can measure rlcm-fast: stop before spending the budget
    tail -n 15 "$out/install.log"
    exit 1
fi

# check_claims' STOP_GRACE_S (15 s) for a stage stopped at its timeout, its judging, the packing.
reserve_s=25
left=$(( budget_s - ($(date +%s) - started) - reserve_s ))
if [ "$left" -lt 30 ]; then
    echo "only $left s of the $budget_s s budget left after the install: no stage runs"
    exit 1
fi
echo "check_claims gets $left s"
mkdir -p "$out/results"
# As a script, check_claims.py has benchmarks/ (not the tree's root) on sys.path: its stages import the
# installed rlcm_fast, with its compiled extensions.
RLCM_FAST_COMMIT=$commit python3 benchmarks/check_claims.py --budget-s "$left" --stages "$stages" \
    --out-dir "$out/results"
echo "lent_gpu.sh done after $(( $(date +%s) - started )) s"
