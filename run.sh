#!/usr/bin/env bash
# One entry point for the project. Every command sets up the environment first (idempotent, cached).
#
#   ./run.sh demo              2 CPU ranks: tiny MoE -> EP load under ZeRO-3 -> deepspeed.initialize -> one step,
#                              compared with a single-process model
#   ./run.sh test [args]       the test suite (pytest args pass through)
#   ./run.sh finetune [args]   the whole flow on 2 CPU ranks: train, checkpoint, resume, export, reload and compare
#   ./run.sh verify [args]     `python -m ep_ds_shim verify` on 2 CPU ranks (every MoE family with an EP plan)
#   ./run.sh matrix [REL..]    support-matrix rows on real releases (default: all) in their own environment,
#                              checked against the committed table; --newest: the canary row of the newest release
#   ./run.sh matrix-all [--render]  every row (declared releases + wrapt/DeepSpeed/torch/accelerate rows),
#                              checked; --render: the committed table made from exactly these rows
#   ./run.sh matrix-ci         the rows CI runs: each release line's oldest and newest release + the same extra rows,
#                              checked against the committed table
#   ./run.sh add-release X.Y.Z run X.Y.Z's row; if no column fails: render the table, move the declared range
#                              (ep_ds_shim/releases/verified.py, pyproject.toml), run the release unit tests
#   ./run.sh wheel-check       the user's install: the wheel with its dependencies into a fresh environment that has
#                              only torch; the doctor, verify (one family) and the README's quickstart on 2 ranks
#                              from outside the checkout, then the unit tests against the installed package
#   ./run.sh bench [--quick]   benchmarks (see README, Performance)
#   ./run.sh setup             only build the environment (.venv, DeepSpeed built against the installed torch)
#
# Environment: EP_DS_SHIM_VENV (default .venv), TORCH_SPEC (default torch==2.13.0, the CPU wheel).
# transformers: CI's default release, the newest declared in ep_ds_shim/releases/verified.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${EP_DS_SHIM_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
DEEPSPEED_SPEC="${DEEPSPEED_SPEC:-deepspeed==0.19.8}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed JIT-builds a small C++ op on first use (1-2 min); keep it in the ignored build folder.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/build/torch_extensions}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
WHEELS="$ROOT/build/wheels"
CI_RELEASE="$(python3 "$ROOT/tools/releases.py" ci-release)"

# make_env VENV TORCH_SPEC: a virtual environment with torch, the CI requirements and DeepSpeed (no ep-ds-shim).
make_env() {
    local venv="$1" torch_spec="$2"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    local pip=("$venv/bin/python" -m pip install -q)
    "${pip[@]}" --upgrade pip
    # torch first and alone: a bare torch requirement elsewhere could pull a multi-GB CUDA build.
    "${pip[@]}" "$torch_spec"
    "${pip[@]}" -r "$ROOT/requirements/ci.txt"
    # transformers on its own: where the index cannot satisfy one of its requirements (5.25: kernels>=0.19.1), it
    # goes in without it and the switch transformers has for it is applied at run time (apply_switches)
    "$venv/bin/python" "$ROOT/tools/releases.py" install "$CI_RELEASE"
    # DeepSpeed ships as an sdist: build it once against the installed torch, no ops compiled ahead of time, and
    # keep the wheel, so every other environment (matrix, wheel check) installs it in seconds.
    # (DS_BUILD_OPS=0 gives a pure-Python wheel: it does not depend on the torch it was built against)
    local cache="$WHEELS/$DEEPSPEED_SPEC"
    if ! ls "$cache"/deepspeed-*.whl >/dev/null 2>&1; then
        mkdir -p "$cache"
        DS_BUILD_OPS=0 "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$cache" "$DEEPSPEED_SPEC"
    fi
    "${pip[@]}" --no-deps "$cache"/deepspeed-*.whl
}

setup() {
    build_env
    apply_switches
}

build_env() {
    local stamp="$VENV/.ep-ds-shim-setup"
    local want
    want="$(cat "$ROOT/requirements/ci.txt" "$ROOT/pyproject.toml"; echo "$TORCH_SPEC $DEEPSPEED_SPEC $CI_RELEASE")"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "== setting up $VENV"
    make_env "$VENV" "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
    mkdir -p "$TORCH_EXTENSIONS_DIR"
    echo "$want" > "$stamp"
}

py() { "$VENV/bin/python" "$@"; }
# The switches the installed transformers needs to run despite an unmet requirement of its own (said on stderr;
# e.g. USE_HUB_KERNELS=0 for 5.25 without kernels>=0.19.1), unless the caller set them.
apply_switches() { eval "$("${1:-$VENV/bin/python}" "$ROOT/tools/releases.py" env)"; }
# matrix_rows ARGS: rows in the matrix environment (build/venvs/matrix, or one per --torch), added to build/matrix.
# Rows swap transformers (and wrapt / DeepSpeed / accelerate) there, never in .venv.
matrix_rows() {
    local matrix_torch="$TORCH_SPEC" matrix_venv="$ROOT/build/venvs/matrix" args=("$@") i
    for ((i = 0; i < ${#args[@]}; i++)); do
        if [[ "${args[i]}" == "--torch" ]]; then
            matrix_torch="torch==${args[i+1]}" matrix_venv="$ROOT/build/venvs/matrix-torch${args[i+1]}"
        fi
    done
    # each environment keeps its own DeepSpeed op: torch rebuilds it when the interpreter's paths differ
    local extensions="$ROOT/build/torch_extensions-$(basename "$matrix_venv")"
    [[ -f "$matrix_venv/.ready" ]] || { make_env "$matrix_venv" "$matrix_torch"; touch "$matrix_venv/.ready"; }
    "$matrix_venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
    TORCH_EXTENSIONS_DIR="$extensions" "$matrix_venv/bin/python" "$ROOT/tools/matrix.py" run "$@"
}
# The matrix's rows: the given transformers releases (default: every declared one), then CI's default release with
# wrapt 1.x (+ the unit tests), the oldest verified DeepSpeed, the newest torch and the newest accelerate.
# The one list of them (matrix-all, matrix-ci).
matrix_all() {
    matrix_rows "$@"
    matrix_rows "$CI_RELEASE" --wrapt 1.17.3 --unit-tests
    matrix_rows "$CI_RELEASE" --deepspeed 0.19.3
    matrix_rows "$CI_RELEASE" --torch 2.14.1
    matrix_rows "$CI_RELEASE" --accelerate 1.16.0 --tests tests/distributed/training/test_launchers.py
}
torchrun2() { py -m torch.distributed.run --nproc_per_node="${NPROC:-2}" --master_addr=127.0.0.1 \
    --master_port="${MASTER_PORT:-29511}" "$@"; }

case "${1:-}" in
    setup)
        setup ;;
    demo)
        shift; setup
        cd "$ROOT"
        torchrun2 examples/train_ep_zero3.py "$@" ;;
    test)
        shift; setup
        cd "$ROOT"
        py -m pytest "$@" ;;
    finetune)
        shift; setup
        cd "$ROOT"
        py examples/finetune.py "$@" ;;
    verify)
        shift; setup
        cd "$ROOT"
        torchrun2 -m ep_ds_shim verify --work-dir build/verify "$@" ;;
    matrix)
        shift; setup
        cd "$ROOT"
        # a fresh set of rows, except for the canary, which reuses the newest release's row if this session ran it
        [[ " $* " == *" --newest "* ]] || rm -f build/matrix/*.json
        matrix_rows "$@"
        py tools/matrix.py check "$@" ;;
    matrix-all)
        shift; setup
        cd "$ROOT"
        rm -f build/matrix/*.json
        matrix_all
        if [[ "${1:-}" == "--render" ]]; then
            py tools/matrix.py render --fresh
        else
            py tools/matrix.py check
        fi ;;
    matrix-ci)
        shift; setup
        cd "$ROOT"
        rm -f build/matrix/*.json
        # shellcheck disable=SC2046  # one word per release
        matrix_all $(py tools/releases.py edge-rows)
        py tools/matrix.py check ;;
    add-release)
        shift; setup
        cd "$ROOT"
        [[ $# -eq 1 ]] || { echo "usage: ./run.sh add-release X.Y.Z"; exit 2; }
        rm -f build/matrix/*.json
        matrix_rows "$1"                        # newer than the range: with the opt-in, as the canary
        py tools/matrix.py verdict "$1"         # a failing column stops here: nothing is moved
        py tools/releases.py add "$1"           # the declaration and pyproject.toml
        py tools/matrix.py render               # after the move: the table states the range it was rendered for
        CI_RELEASE="$(python3 tools/releases.py ci-release)"
        setup                                   # .venv moves to the new CI release
        py -m pytest -q tests/unit/releases tests/unit/patching tests/unit/test_doctor.py
        echo "== $1 added. Left to you: the README's release facts (tests/unit/test_readme.py checks them), a"
        echo "   CHANGELOG line, and a commit of the declaration, pyproject.toml and the rendered table." ;;
    wheel-check)
        shift; setup
        cd "$ROOT"
        # The user's install (README, Install): torch first, then the wheel WITH its dependencies (transformers,
        # accelerate, wrapt, DeepSpeed's own), nothing else; DeepSpeed's wheel from the cache saves building its sdist.
        rm -rf build/dist build/venvs/wheel-check build/wheel-run
        py -m pip wheel -q --no-deps --no-build-isolation -w build/dist "$ROOT"
        python3 -m venv build/venvs/wheel-check
        wc=(build/venvs/wheel-check/bin/python -m pip install -q)
        "${wc[@]}" --upgrade pip
        "${wc[@]}" "$TORCH_SPEC"
        "${wc[@]}" --no-deps "$WHEELS/$DEEPSPEED_SPEC"/deepspeed-*.whl
        "${wc[@]}" build/dist/ep_ds_shim-*.whl
        wpy="$ROOT/build/venvs/wheel-check/bin/python"
        mkdir -p build/wheel-run && cp examples/quickstart.py build/wheel-run/
        # from outside the checkout, so the installed package is what gets imported
        apply_switches "$wpy"
        (cd build/wheel-run && "$wpy" -c \
            'import ep_ds_shim, accelerate, sys; f = ep_ds_shim.__file__; print("installed package:", f); sys.exit("site-packages" not in f)')
        (cd build/wheel-run && "$wpy" -m ep_ds_shim doctor)
        (cd build/wheel-run && "$wpy" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
            --master_port "${MASTER_PORT:-29511}" -m ep_ds_shim verify --model-type qwen3_moe)
        (cd build/wheel-run && "$wpy" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
            --master_port "${MASTER_PORT:-29511}" quickstart.py)
        "${wc[@]}" "pytest>=8"
        (cd build && venvs/wheel-check/bin/python -m pytest -q -p no:cacheprovider --import-mode=importlib \
            --rootdir "$ROOT" "$ROOT/tests/unit" "$@") ;;
    bench)
        shift; setup
        cd "$ROOT"
        py benchmarks/run.py "$@" ;;
    *)
        sed -n '2,21p' "$0"; exit 2 ;;
esac
