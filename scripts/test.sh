#!/usr/bin/env bash
# The test command: install the project with its test extras, then run the unit tests,
# the real-data tests (skipped when ../shared/data is absent) and every notebook under
# nbval in smoke mode. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export TOKENIZERS_PARALLELISM=false MSD_MODE=smoke MPLBACKEND=Agg
python -m pytest "$@"
