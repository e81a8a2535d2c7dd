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
#   ./run.sh wheel-check       the user's install: the wheel with its dependencies into a fresh environment that has
#                              only torch; the doctor, verify (one family) and the README's quickstart on 2 ranks
#                              from outside the checkout, then the unit tests against the installed package
#   ./run.sh bench [--quick]   benchmarks (see README, Performance)
#   ./run.sh setup             only build the environment (.venv, DeepSpeed built against the installed torch)
#
# Environment: EP_DS_SHIM_VENV (default .venv), TORCH_SPEC (default torch==2.13.0, the CPU wheel).
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

# make_env VENV TORCH_SPEC: a virtual environment with torch, the CI requirements and DeepSpeed (no ep-ds-shim).
make_env() {
    local venv="$1" torch_spec="$2"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    local pip=("$venv/bin/python" -m pip install -q)
    "${pip[@]}" --upgrade pip
    # torch first and alone: a bare torch requirement elsewhere could pull a multi-GB CUDA build.
    "${pip[@]}" "$torch_spec"
    "${pip[@]}" -r "$ROOT/requirements/ci.txt"
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
    local stamp="$VENV/.ep-ds-shim-setup"
    local want
    want="$(cat "$ROOT/requirements/ci.txt" "$ROOT/pyproject.toml"; echo "$TORCH_SPEC $DEEPSPEED_SPEC")"
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
        # Rows swap transformers (and wrapt / DeepSpeed) in their own environment, never in .venv; a row on another
        # torch (--torch X) gets an environment (and a DeepSpeed op cache) of its own.
        matrix_torch="$TORCH_SPEC" matrix_venv="$ROOT/build/venvs/matrix"
        args=("$@")
        for ((i = 0; i < ${#args[@]}; i++)); do
            if [[ "${args[i]}" == "--torch" ]]; then
                matrix_torch="torch==${args[i+1]}" matrix_venv="$ROOT/build/venvs/matrix-torch${args[i+1]}"
            fi
        done
        # each environment keeps its own DeepSpeed op: torch rebuilds it when the interpreter's paths differ
        export TORCH_EXTENSIONS_DIR="$ROOT/build/torch_extensions-$(basename "$matrix_venv")"
        [[ -f "$matrix_venv/.ready" ]] || { make_env "$matrix_venv" "$matrix_torch"; touch "$matrix_venv/.ready"; }
        "$matrix_venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
        # a fresh set of rows, except for the canary, which reuses the newest release's row if this session ran it
        [[ " $* " == *" --newest "* ]] || rm -f build/matrix/*.json
        "$matrix_venv/bin/python" tools/matrix.py run "$@"
        py tools/matrix.py check "$@" ;;
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
        sed -n '2,16p' "$0"; exit 2 ;;
esac
