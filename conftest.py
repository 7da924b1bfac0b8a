"""Pytest defaults for a bare ``pytest`` run from the repository root.

The notebooks read ``MSD_MODE`` and default to ``cpu-demo``, which trains for minutes
per notebook. Tests must run them in ``smoke`` mode, as ``scripts/test.sh`` does, so a
bare ``pytest`` gets the same environment. The kernels that nbval starts inherit it.
Values already set in the environment are kept.
"""

import os

TEST_ENVIRONMENT = {
    "MSD_MODE": "smoke",
    "MPLBACKEND": "Agg",  # figures render without a display
    "TOKENIZERS_PARALLELISM": "false",  # no fork warnings from the tokenizers library
}


def pytest_configure(config):
    for name, value in TEST_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
