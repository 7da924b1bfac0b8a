#!/usr/bin/env bash
# The main job: install, pretrain the cpu-demo preset on PhantomCXR (generated offline),
# then evaluate it. Extra arguments go to `python -m msd_core pretrain`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh demo,viz
export TOKENIZERS_PARALLELISM=false
python -m msd_core pretrain --preset cpu-demo "$@"
