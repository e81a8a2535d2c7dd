#!/usr/bin/env bash
# One entry point for the project. Every command sets up the environment first (idempotent, cached).
#
#   ./run.sh demo            2 CPU ranks: tiny MoE -> EP load under ZeRO-3 -> deepspeed.initialize -> one step,
#                            compared with a single-process model
#   ./run.sh test [args]     the test suite (pytest args pass through)
#   ./run.sh matrix [REL..]  support-matrix rows on real releases (default: all), checked against the committed
#                            table; `python tools/matrix.py render` regenerates it
#   ./run.sh bench           benchmarks (load time, peak RSS, shim overhead) - see README, Performance
#   ./run.sh setup           only build the environment (.venv, DeepSpeed built against the installed torch)
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

setup() {
    local stamp="$VENV/.ep-ds-shim-setup"
    local want
    want="$(cat "$ROOT/requirements/ci.txt" "$ROOT/pyproject.toml"; echo "$TORCH_SPEC $DEEPSPEED_SPEC")"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "== setting up $VENV"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install -q)
    "${pip[@]}" --upgrade pip
    # torch first and alone: a bare torch requirement elsewhere could pull a multi-GB CUDA build.
    "${pip[@]}" "$TORCH_SPEC"
    "${pip[@]}" -r "$ROOT/requirements/ci.txt"
    # DeepSpeed ships as an sdist: build it against the installed torch, no ops compiled ahead of time.
    DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$DEEPSPEED_SPEC"
    "${pip[@]}" --no-deps --no-build-isolation -e "$ROOT"
    mkdir -p "$TORCH_EXTENSIONS_DIR"
    echo "$want" > "$stamp"
}

py() { "$VENV/bin/python" "$@"; }

case "${1:-}" in
    setup)
        setup ;;
    demo)
        shift; setup
        cd "$ROOT"
        py -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 --master_port="${MASTER_PORT:-29511}" \
            examples/train_ep_zero3.py "$@" ;;
    test)
        shift; setup
        cd "$ROOT"
        py -m pytest "$@" ;;
    matrix)
        shift; setup
        cd "$ROOT"
        rm -f build/matrix/*.json
        py tools/matrix.py run "$@"
        py tools/matrix.py check ;;
    bench)
        shift; setup
        cd "$ROOT"
        py benchmarks/run.py "$@" ;;
    *)
        sed -n '2,13p' "$0"; exit 2 ;;
esac
