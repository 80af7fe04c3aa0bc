#!/usr/bin/env bash
# A venv with MaxText from PyPI for the baselines of benchmarks/train.py and benchmarks/serve.py
# (--maxtext-python VENV/bin/python). MaxText's wheel declares its dependencies only under the
# accelerator extras; it ships a hardware-neutral list, which is installed here without the CUDA
# wheels, so jax runs on the CPU.
#
#   bash benchmarks/maxtext_venv.sh [VENV=.venv-maxtext] [VERSION=0.2.5]
set -euo pipefail
venv=${1:-.venv-maxtext}
version=${2:-0.2.5}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps "maxtext==$version" -d "$work"
wheel=$(ls "$work"/maxtext-*.whl)
"$python" -m zipfile -e "$wheel" "$work/wheel"
grep -vE '^(nvidia-|cuda-|apache-tvm-ffi)' \
  "$work/wheel/dependencies/requirements/generated_requirements/decoupled-requirements.txt" \
  > "$work/requirements-cpu.txt"
"$python" -m uv venv "$venv" --python "$python"
"$python" -m uv pip install --python "$venv/bin/python" "$wheel" -r "$work/requirements-cpu.txt"
echo "MaxText $version installed: use --maxtext-python $venv/bin/python"
