#!/usr/bin/env bash
# The GPU check on a borrowed GPU machine, from the repository's root:
#   bash benchmarks/gpu_check.sh OUT_DIR [--budget 420] [--only PARTS]
# Installs the wheels in .whl/ (the project's own wheel and the dependencies that machine lacks;
# benchmarks/README.md, "GPU", says which and how to fetch them) into /tmp/site, then runs
# benchmarks/gpu_check.py, which writes gpu_check.json, gpu_check.md and cuda_tests.log to
# OUT_DIR. Every part has its own try block, and no part starts after --budget seconds.
set -u
out="${1:?usage: gpu_check.sh OUT_DIR [options]}"
shift
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 -m benchmarks.gpu_check "$out" "$@"
