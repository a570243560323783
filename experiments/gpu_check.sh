#!/usr/bin/env bash
# The GPU check: the mechanism's tests on the GPU, then the benchmark grid, in
# one command with a time budget (default 470 s) for a short device lease.
#
#   bash experiments/gpu_check.sh --prepare          # here, where pip reaches PyPI:
#                                                    #   fills .gpu_wheels/ (git-ignored)
#   bash experiments/gpu_check.sh [--out DIR]        # on the GPU machine (no network):
#                                                    #   installs .gpu_wheels/, tests, benchmarks
#   bash experiments/gpu_check.sh --tiny --out DIR   # CPU smoke test: tiny-bert, one cell, no pytest
#
# Options: --out DIR (default $OUT, else ./gpu_check_out), --budget SECONDS for
# the whole check (default 470), --test-budget SECONDS for pytest (default 200),
# --skip-tests, --skip-bench. PYTHON picks the interpreter (default python3).
#
# The full check writes to DIR: gpu_check.md (the pytest summary and the
# benchmark table), benchmarks.md, benchmarks.json, pytest.log, env.txt and
# gpu_check.log (everything the benchmarks printed): six files, within what a
# device run brings back. The benchmark grid (experiments/gpu_check.py):
# MiniLM-L6- and RoBERTa-base-shaped random models, full and LoRA fine-tuning,
# float32 and bfloat16, physical batch 32 and 256, length 128; non-private,
# DP-SGD and ANADP with the ghost engine. Cells that would overrun the budget
# are listed as skipped.
#
# The machine cannot download anything: dp-accounting and ml-collections travel
# as wheels in .gpu_wheels/ (pure Python; their own needs, absl-py and PyYAML,
# are on the image per the device's KINDS.md). .gpu_wheels/ is git-ignored, so
# a device run must carry it: run(command="bash experiments/gpu_check.sh",
# carry=[".gpu_wheels"]).

set -uo pipefail  # no -e: a failing step is recorded and the next one still runs
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
WHEELS=.gpu_wheels
WHEEL_NAMES=(dp-accounting ml-collections)
SITE=/tmp/gpu_check_site
TEST_FILES=(tests/test_clipping.py tests/test_ghost.py tests/test_noise.py tests/test_mixed_precision.py)

mode=full
out_dir="${OUT:-gpu_check_out}"
budget=470
test_budget=200
run_tests=1
run_bench=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) mode=prepare ;;
        --tiny) mode=tiny ;;
        --out) out_dir="$2"; shift ;;
        --budget) budget="$2"; shift ;;
        --test-budget) test_budget="$2"; shift ;;
        --skip-tests) run_tests=0 ;;
        --skip-bench) run_bench=0 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

start=$SECONDS
seconds_left() { echo $((budget - (SECONDS - start))); }

installed_version() {
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null
}

# --prepare: the wheels the GPU machine lacks, at the versions installed here
# (the ones the tests pass with), for Python 3.12.
prepare_wheels() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"  # one version of each: two would stop the install
    local name version
    for name in "${WHEEL_NAMES[@]}"; do
        version="$(installed_version "$name")"
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            -d "$WHEELS" "$name${version:+==$version}" || return 1
    done
    if ls "$WHEELS"/*.whl | grep -v -- '-none-any\.whl$'; then
        echo "gpu_check.sh: the wheels above are not pure Python; they may not install on the GPU machine" >&2
    fi
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

install_wheels() {
    if "$PY" -c "import dp_accounting, ml_collections" 2>/dev/null; then
        return 0
    fi
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: dp-accounting / ml-collections are missing and $WHEELS/ holds no wheels:" \
             "run 'bash experiments/gpu_check.sh --prepare' where pip works, and carry $WHEELS" >&2
        return 1
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --find-links "$WHEELS" --target "$SITE" "$WHEELS"/*.whl || return 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import dp_accounting, ml_collections"
}

describe_machine() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: none"
    env -u JAX_PLATFORMS "$PY" -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print('devices', jax.devices()); \
jax.default_backend() == 'gpu' or print('warning: JAX sees no GPU; this check runs on', jax.default_backend())"
}

# The tests on the default backend. tests/conftest.py sets JAX_PLATFORMS=cpu
# when the variable is absent, so it is set empty here (empty: JAX picks the
# default backend). launch.py's end-to-end test needs data; it stays on CPU CI.
run_pytest() {
    local workers=()
    if "$PY" -c "import xdist" 2>/dev/null; then
        workers=(-n 4)  # compiling many small programs is CPU work: 4 processes share the GPU
    fi
    JAX_PLATFORMS="" XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$test_budget" \
        "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" "${TEST_FILES[@]}" -k "not end_to_end" \
        >"$out_dir/pytest.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "pytest stopped at its budget of $test_budget s" >>"$out_dir/pytest.log"
    return $rc
}

# The grid: a soft budget for starting cells, a hard one for the process.
run_grid() {
    local grid=$1 soft=$2 hard=$3
    local env_args=()
    [ "$grid" = full ] && env_args=(-u JAX_PLATFORMS)  # the default backend
    timeout "$hard" env "${env_args[@]}" "$PY" experiments/gpu_check.py --grid="$grid" --out="$out_dir" \
        --budget_s="$soft" >>"$out_dir/gpu_check.log" 2>&1
}

write_summary() {
    local tests_status=$1
    {
        echo "# GPU check"
        echo
        sed 's/^/    /' "$out_dir/env.txt"
        echo
        echo "## Tests: ${TEST_FILES[*]}"
        echo
        echo "$tests_status"
        [ -f "$out_dir/pytest.log" ] && tail -n 15 "$out_dir/pytest.log" | sed 's/^/    /'
        echo
        echo "## Benchmarks"
        echo
        cat "$out_dir/benchmarks.md" 2>/dev/null || echo "no benchmark ran (see gpu_check.log)"
    } >"$out_dir/gpu_check.md"
}

main() {
    if [ "$mode" = prepare ]; then
        prepare_wheels
        return
    fi
    mkdir -p "$out_dir"
    if [ "$mode" = tiny ]; then
        run_grid tiny "$budget" "$budget" || { cat "$out_dir/gpu_check.log" >&2; return 1; }
        cat "$out_dir/benchmarks.md"
        return
    fi
    install_wheels || return 1
    describe_machine >"$out_dir/env.txt" 2>&1
    cat "$out_dir/env.txt"
    local tests_rc=0 tests_status="not run (--skip-tests)"
    if [ $run_tests = 1 ]; then
        echo "pytest (at most $test_budget s) ..."
        run_pytest
        tests_rc=$?
        tests_status="pytest exit status $tests_rc after $((SECONDS - start)) s (0: all passed)"
        echo "$tests_status"
    fi
    local bench_rc=0
    if [ $run_bench = 1 ]; then
        local left
        left=$(seconds_left)
        echo "benchmarks (about $left s left) ..."
        run_grid full $((left - 60)) $((left - 10))
        bench_rc=$?
    fi
    write_summary "$tests_status"
    cat "$out_dir/gpu_check.md"
    [ $tests_rc = 0 ] && [ $bench_rc = 0 ]
}

main
