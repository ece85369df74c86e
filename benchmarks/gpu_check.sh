#!/usr/bin/env bash
# The GPU check: camfn's CUDA tests, then a short GPU race (benchmarks/gpu.py), written to
# benchmarks/results/gpu.md. Planned for under 8 minutes on one H100/H200-class GPU: each stage has a budget.
#
#   bash benchmarks/gpu_check.sh
#
# Python: $CAMFN_PYTHON, else .venv/bin/python (make test's), else python3 when it already has a CUDA torch
# (a GPU image's own), else a new venv ($CAMFN_GPU_VENV, default /tmp/camfn-gpu-venv) with torch from pip.
# The project is installed into it with its test extras (pip; from the wheels in $CAMFN_WHEELS or .whl when
# that folder exists, for machines without an index); where pip cannot, only what the check needs, and camfn
# runs from this checkout either way (PYTHONPATH). Without a CUDA device it prints "no CUDA: ..." and exits
# 0 at once, leaving the results alone.
# Budgets (seconds): CAMFN_GPU_TEST_SECONDS (default 150), CAMFN_GPU_RACE_SECONDS (default 270);
# CAMFN_GPU_RACE_ARGS: extra options for benchmarks/gpu.py (e.g. "--compiled" to time eager calls only).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
results=benchmarks/results/gpu.md
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
start=$SECONDS

python=${CAMFN_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=$(command -v python3 || true); fi
fi

cuda_probe='import sys
try:
    import torch
except ImportError:
    print(f"no CUDA: torch is not installed for {sys.executable}"); sys.exit(3)
if not torch.cuda.is_available():
    print(f"no CUDA: torch {torch.__version__} sees no CUDA device here; the GPU check needs one"); sys.exit(3)
print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")'

# 1. A GPU at all? (nvidia-smi when there is one; else ask torch, which also covers other setups)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    if [[ -z $python ]] || ! "$python" -c "$cuda_probe"; then
        echo "no CUDA: no NVIDIA GPU found (nvidia-smi missing or failing); nothing to check, $results unchanged"
        exit 0
    fi
fi

# 2. The environment: a python whose torch uses the GPU, then the project with its test extras in it
if [[ -z ${CAMFN_PYTHON:-} && ! -x .venv/bin/python ]] && ! "$python" -c "$cuda_probe" >/dev/null 2>&1; then
    venv=${CAMFN_GPU_VENV:-${TMPDIR:-/tmp}/camfn-gpu-venv} # python3 has no CUDA torch: a venv of our own
    [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
    python=$venv/bin/python
    "$python" -m pip install -q torch torchvision || echo "note: pip could not install torch into $venv"
fi
if ! "$python" -c "$cuda_probe"; then
    echo "no CUDA: $python cannot use the GPU (a CPU-only torch?); set CAMFN_PYTHON to a CUDA-enabled python"
    exit 0
fi
wheels=${CAMFN_WHEELS:-.whl} # for machines without a package index: pip download ... -d .whl (README)
pip=("$python" -m pip install -q --no-build-isolation --retries 0 --timeout 15)
[[ -d $wheels ]] && pip+=(--no-index --find-links "$wheels")
if ! "${pip[@]}" -e '.[test]' >/dev/null 2>&1; then
    echo "note: pip could not install .[test] here (no index?); installing what the check needs, one by one"
    "${pip[@]}" --no-deps -e . >/dev/null 2>&1 || echo "note: camfn itself runs from this checkout (PYTHONPATH)"
    for need in pytest:pytest hypothesis:hypothesis grad-cam==1.5.7:pytorch_grad_cam torchcam==0.5.0:torchcam \
        ttach:ttach; do
        "$python" -c "import ${need#*:}" 2>/dev/null || "${pip[@]}" --no-deps "${need%%:*}" >/dev/null 2>&1 ||
            echo "note: ${need%%:*} is missing (its tests and race columns show as skipped or '-')"
    done
fi
echo "python: $python ($((SECONDS - start)) s so far)"

# 3. The CUDA tests: every test file that mentions CUDA or NCCL (tests/test_devices.py and any others)
mapfile -t cuda_tests < <(grep -lisE 'cuda|nccl' tests/test_*.py || true)
[[ ${#cuda_tests[@]} -gt 0 ]] || cuda_tests=(tests/test_devices.py)
test_budget=${CAMFN_GPU_TEST_SECONDS:-150}
race_budget=${CAMFN_GPU_RACE_SECONDS:-270}
summary=$(mktemp)
log=$(mktemp)
set +e
timeout "$test_budget" "$python" -m pytest "${cuda_tests[@]}" -q -rs -p no:cacheprovider 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
set -e
stopped=""
[[ $tests_rc == 124 ]] && stopped=": stopped at its time budget of $test_budget s"
{
    echo "## CUDA tests"
    echo
    echo "- command: \`python -m pytest ${cuda_tests[*]} -q -rs\` (exit code $tests_rc$stopped)"
    echo "- result: $(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -1 || echo 'no summary line')"
    grep -E '^(FAILED|ERROR|SKIPPED)' "$log" | head -40 | sed 's/^/- /' || true
} >"$summary"
mkdir -p "$(dirname "$results")"
cp "$summary" "$results" # the race rewrites it with the rows that finish

# 4. The race (rewrites the report after every row; stopped at its budget, it keeps the rows that finished)
set +e
timeout "$race_budget" "$python" -m benchmarks.gpu --preamble "$summary" --markdown "$results" ${CAMFN_GPU_RACE_ARGS:-}
race_rc=$?
set -e
if [[ $race_rc == 124 ]]; then
    echo "- the race was stopped at its time budget ($race_budget s): rows missing above did not finish" >>"$results"
elif [[ $race_rc != 0 ]]; then
    echo "- the race failed (exit code $race_rc); its output above the failure is in the log of this run" >>"$results"
fi
echo "wrote $results in $((SECONDS - start)) s (tests exit $tests_rc, race exit $race_rc)"
[[ $tests_rc == 0 && ($race_rc == 0 || $race_rc == 124) ]]
