#!/usr/bin/env bash
# Reference venv for the benchmarks that run nnU-Net v2 itself (benchmarks/bench_real_data.py --systems nnunet;
# its batchgeneratorsv2 transforms for the augmentation benchmark). Kept apart from .venv so that nnU-Net's
# dependencies never change the pipeline's environment.
#
#   bash benchmarks/setup_reference_venv.sh [VENV]      # default /work/venv-ref (or $REF_VENV)
#
# torch stays 2.13.0 (the CPU wheel this machine has): nnunetv2 -> timm -> torchvision would otherwise pull
# the newest torchvision and with it a newer, multi-GB CUDA torch; pinning torch in the same pip call makes
# pip choose the matching torchvision (0.28.0). Idempotent; serialised by a lock so that two sessions that
# create the same venv do not interleave.
#
# The benchmark's trainer (benchmarks/nnunet_ext/trainers/nnUNetTrainerBudget.py) is linked into the installed
# nnunetv2/training/nnUNetTrainer/ folder (bench_real_data.py does it too): nnU-Net finds trainers by importing
# every module of that package first, one of which imports timm -> torchvision, and PyPI's torchvision 0.28.0
# is a CUDA build that cannot be imported next to the CPU torch ("operator torchvision::nms does not exist");
# a module at the top of the folder is found before that subpackage is imported.
set -euo pipefail

VENV="${1:-${REF_VENV:-/work/venv-ref}}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
NNUNET="nnunetv2==2.8.1"

exec 9>"${REF_VENV_LOCK:-/tmp/venv-ref.lock}"
flock 9

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH"
# dry run first: refuse anything that would replace torch
plan="$("$VENV/bin/python" -m pip install --dry-run "$NNUNET" "$TORCH" 2>&1 | grep '^Would install' || true)"
if echo "$plan" | tr ' ' '\n' | grep -E '^(torch-|nvidia-|triton-)' | grep -v '^torch-2\.13\.0' >/dev/null; then
    echo "refusing: installing $NNUNET would change torch: $plan" >&2
    exit 1
fi
"$VENV/bin/python" -m pip install -q "$NNUNET" "$TORCH"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import torch

assert torch.__version__.startswith("2.13.0"), torch.__version__
print("reference venv ok:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "torchvision", "nnunetv2", "batchgeneratorsv2", "dynamic_network_architectures")))
EOF
site="$("$VENV/bin/python" -c 'import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))')"
ln -sfn "$(cd "$(dirname "$0")" && pwd)/nnunet_ext/trainers/nnUNetTrainerBudget.py" \
    "$site/training/nnUNetTrainer/nnUNetTrainerBudget.py"
echo "trainer linked: $site/training/nnUNetTrainer/nnUNetTrainerBudget.py"
