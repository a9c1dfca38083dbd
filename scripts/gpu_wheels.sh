#!/usr/bin/env bash
# The Python packages a bare GPU machine (Python 3.12, torch, lightning, torchdiffeq, torchmetrics, torchvision,
# scipy, scikit-learn, matplotlib) lacks for fmlab, as wheels in .wheels/ (git-ignored), at the versions this
# checkout's .venv runs: hydra-core, omegaconf and its antlr4 runtime, POT, torch-fidelity. Run it on a machine with
# a package index; scripts/gpu_check.sh installs them there with --no-deps, offline. W&B is left out: the check logs
# to CSV (logger=csv), so nothing imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .wheels
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .wheels "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" "POT==$(version POT)" \
  "torch-fidelity==$(version torch-fidelity)"
# antlr4-python3-runtime is published as a source archive only: build its pure-Python wheel here
"$PY" -m pip wheel -q --no-deps -w .wheels "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -la .wheels
