#!/usr/bin/env bash
# Virtual environments for the peers `ecomserve bench --peer KIND=VENV` measures (issue 18).
# ecomserve never imports them: each peer runs from its own venv, offline, on the bundled model.
#
#   scripts/setup_peers.sh infinity  /work/peers/infinity    # infinity-emb 0.0.78: server, optimum (ONNX Runtime), torch
#   scripts/setup_peers.sh fastembed /work/peers/fastembed   # fastembed 0.9.x (ONNX Runtime, in-process)
#   scripts/setup_peers.sh all       /work/peers             # both, as /work/peers/infinity and /work/peers/fastembed
#
# Infinity's `[all]` extra pulls a second torch (2.8); `[server,optimum,torch]` with a local CPU torch wheel
# (TORCH_WHEEL, default: the one in /opt/wheels when present) keeps one CPU torch. PYTHON picks the interpreter.
set -euo pipefail

kind=${1:?usage: setup_peers.sh infinity|fastembed|all VENV}
target=${2:?usage: setup_peers.sh infinity|fastembed|all VENV}
python=${PYTHON:-python3}
torch_wheel=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*cpu*.whl 2>/dev/null | head -n 1 || true)}
INFINITY_VERSION=0.0.78
FASTEMBED_SPEC='fastembed>=0.9,<0.10'

make_venv() {
  "$python" -m venv "$1"
  "$1/bin/pip" install --quiet --upgrade pip
}

setup_infinity() {
  local venv=$1
  make_venv "$venv"
  local torch_args=()
  if [[ -n "$torch_wheel" ]]; then
    torch_args=("$torch_wheel")
  else
    torch_args=(torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
  fi
  "$venv/bin/pip" install "${torch_args[@]}"
  "$venv/bin/pip" install "infinity-emb[server,optimum,torch]==${INFINITY_VERSION}" ${torch_wheel:+"$torch_wheel"}
  "$venv/bin/infinity_emb" v2 --help >/dev/null
  echo "infinity: $venv/bin/infinity_emb"
}

setup_fastembed() {
  local venv=$1
  make_venv "$venv"
  "$venv/bin/pip" install "$FASTEMBED_SPEC"
  "$venv/bin/python" -c "import fastembed; print('fastembed', fastembed.__version__)"
}

case "$kind" in
  infinity) setup_infinity "$target" ;;
  fastembed) setup_fastembed "$target" ;;
  all)
    setup_infinity "$target/infinity"
    setup_fastembed "$target/fastembed"
    ;;
  *) echo "unknown peer kind '$kind': infinity, fastembed or all" >&2; exit 2 ;;
esac
