#!/usr/bin/env bash
# Install the project and what it needs into the active Python environment.
#
# Usage: bash scripts/install.sh [EXTRAS]   (default extras: demo,viz,dicom)
#
# torch is installed only when it cannot be imported, so Colab and conda users keep the
# build that matches their CUDA driver. The version installed here is MSD_TORCH_VERSION
# (default 2.13.0); set it, or install torch yourself first, to use another build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo,viz,dicom}"

if ! python -c "import torch" >/dev/null 2>&1; then
    echo "torch not found: installing torch==${MSD_TORCH_VERSION:-2.13.0}"
    python -m pip install --quiet "torch==${MSD_TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e ".[${extras}]"
python -c "import torch, msd_core; print(f'msd_core ready (torch {torch.__version__})')"
