"""The numbered notebooks as files: header, parameters, setup, exercises, stripped outputs, README table.

Executing them is nbval's job: ``python -m pytest`` runs every notebook under
``notebooks/`` with ``--nbval-lax`` (see ``pyproject.toml``).
"""

import configparser
import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = [
    "00_setup_and_tour",
    "01_data_preparation",
    "02_pretraining_msd",
    "03_embedding_visualisation",
    "04_zero_shot_classification",
    "05_few_shot_linear_probe",
    "06_image_text_retrieval",
    "07_ablation",
]
COLAB_URL = "https://colab.research.google.com/github/msd-teaching/msd-core/blob/main/notebooks/{name}.ipynb"
PARAMETERS_LINE = 'MSD_MODE = os.environ.get("MSD_MODE", "cpu-demo")'
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_all_numbered_notebooks_exist():
    found = sorted(path.stem for path in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == EXPECTED


def test_notebook_folder_only_notebooks():
    extra = [path.relative_to(NOTEBOOK_DIR).as_posix() for path in NOTEBOOK_DIR.rglob("*")
             if path.is_file() and ".ipynb_checkpoints" not in path.parts
             and path.suffix != ".ipynb" and path.name != "sanitize.cfg"]
    assert extra == []


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_valid_nbformat_4(name):
    notebook = read(name)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4


@pytest.mark.parametrize("name", EXPECTED)
def test_json_written_as_jupyter_does(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    text = path.read_text(encoding="utf-8")
    expected = nbformat.writes(nbformat.reads(text, as_version=4))
    assert text.rstrip("\n") == expected.rstrip("\n")
    assert text.startswith('{\n "cells": [\n')


@pytest.mark.parametrize("name", EXPECTED)
def test_first_cell_has_colab_badge(name):
    first = read(name).cells[0]
    assert first.cell_type == "markdown"
    assert COLAB_URL.format(name=name) in first.source
    assert "colab-badge.svg" in first.source


@pytest.mark.parametrize("name", EXPECTED)
def test_header_states_goals_and_times(name):
    first = read(name).cells[0].source
    assert "Learning goals" in first
    assert "Prerequisites" in first
    for mode in ("`smoke`", "`cpu-demo`", "`full`"):
        assert mode in first, mode


@pytest.mark.parametrize("name", EXPECTED)
def test_parameters_cell_reads_msd_mode(name):
    cells = code_cells(read(name))
    parameters = cells[0]
    assert PARAMETERS_LINE in parameters.source
    assert "parameters" in parameters.metadata.get("tags", [])


@pytest.mark.parametrize("name", EXPECTED)
def test_setup_installs_only_on_colab(name):
    setup = code_cells(read(name))[1].source
    condition = 'if "google.colab" in sys.modules:'
    block = setup[setup.index(condition):setup.index("%matplotlib")]
    code_lines = [line for line in block.splitlines() if not line.strip().startswith("#")]
    assert "pip" in block
    assert "git+https://github.com/msd-teaching/msd-core" in block
    assert not any("torch" in line for line in code_lines)
    assert "setup(MSD_MODE)" in setup


@pytest.mark.parametrize("name", EXPECTED)
def test_last_cell_holds_exercises(name):
    last = read(name).cells[-1]
    headings = [line for line in last.source.splitlines() if line.startswith("#")]
    numbered = re.findall(r"^\d+\. ", last.source, flags=re.MULTILINE)
    assert last.cell_type == "markdown"
    assert any("Exercises" in heading for heading in headings)
    assert 2 <= len(numbered) <= 4


@pytest.mark.parametrize("name", EXPECTED)
def test_summary_before_exercises(name):
    before_last = read(name).cells[-2]
    assert before_last.cell_type == "markdown"
    assert before_last.source.startswith("## Summary")


@pytest.mark.parametrize("name", EXPECTED)
def test_unchecked_cells_hold_no_outputs(name):
    for index, cell in enumerate(code_cells(read(name))):
        if CHECK_MARKER in cell.source:
            continue
        assert cell.execution_count is None, f"code cell {index}"
        assert cell.outputs == [], f"code cell {index}"


@pytest.mark.parametrize("name", EXPECTED)
def test_checked_cells_keep_text_output(name):
    # nbval compares a marked cell with its stored output only when the cell records an
    # execution count, so both are committed. Plain text keeps the stored output small.
    for index, cell in enumerate(code_cells(read(name))):
        if CHECK_MARKER not in cell.source:
            continue
        assert isinstance(cell.execution_count, int), f"code cell {index}"
        assert cell.outputs, f"code cell {index} is marked but has no stored output"
        for output in cell.outputs:
            assert output.output_type == "stream", f"code cell {index}"
            assert output.name == "stdout", f"code cell {index}"


@pytest.mark.parametrize("name", EXPECTED)
def test_no_widget_state(name):
    notebook = read(name)
    assert "widgets" not in notebook.metadata
    for cell in notebook.cells:
        assert "widgets" not in cell.metadata


def test_sanitize_config_regexes_compile():
    parser = configparser.ConfigParser()
    parser.read(NOTEBOOK_DIR / "sanitize.cfg", encoding="utf-8")
    assert parser.sections()
    for section in parser.sections():
        re.compile(parser[section]["regex"])
        assert "replace" in parser[section], section


def test_pytest_runs_notebooks_with_nbval():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    options = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert "notebooks" in options["testpaths"]
    assert "--nbval-lax" in options["addopts"]
    assert "notebooks/sanitize.cfg" in options["addopts"]


def test_bare_pytest_defaults_to_smoke_mode(monkeypatch):
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    monkeypatch.delenv("MSD_MODE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "svg")

    root_conftest.pytest_configure(config=None)

    assert os.environ["MSD_MODE"] == "smoke"
    assert os.environ["MPLBACKEND"] == "svg"


@pytest.mark.parametrize("name", EXPECTED)
def test_readme_table_lists_notebook(name):
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.fail("README.md is missing; it needs a table with one row per notebook")
    rows = [line for line in readme.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("|")]
    assert any(f"{name}.ipynb" in row for row in rows), f"no README table row names {name}.ipynb"
