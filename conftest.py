"""Run the book's chapters as nbval tests.

nbval collects only ``.ipynb`` files, but the chapters are jupytext MyST
Markdown files. The hooks below collect every ``book/*.md`` file that Jupyter
Book would execute (one with jupytext front matter in the MyST format), read it
with ``jupytext.read`` and give the notebook to nbval. The kernel starts in the
chapter's folder, as it does in ``jupyter-book build``.

A chapter can be run at test size: if ``book/_nbval_parameters.yml`` maps the
chapter's name to ``{parameter: value}``, a code cell that assigns those values
is inserted right after the chapter's cell tagged ``parameters``, the way
papermill injects parameters.

The browser tests in ``tests/test_browser.py`` check a built book, so they are
deselected unless ``--book-html DIR`` names its folder (``scripts/test.sh``
passes ``book/_build/html`` after the build).
"""

import ast
import functools
from collections import defaultdict
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml
from myst_nb.core.read import is_myst_markdown_notebook
from nbval.plugin import IPyNbCell, IPyNbFile, find_comment_markers, find_metadata_tags

BOOK_DIR = Path(__file__).parent / "book"
PARAMETER_OVERRIDES_FILE = BOOK_DIR / "_nbval_parameters.yml"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


def is_chapter(path: Path) -> bool:
    """Return whether ``path`` is a book chapter that Jupyter Book executes."""
    if path.suffix != ".md" or BOOK_DIR not in path.parents:
        return False
    return is_myst_markdown_notebook(path.read_text(encoding="utf-8"))


@functools.cache
def load_parameter_overrides() -> dict[str, dict]:
    """Read and validate ``book/_nbval_parameters.yml`` (chapter -> parameters)."""
    if not PARAMETER_OVERRIDES_FILE.exists():
        return {}

    overrides = yaml.safe_load(PARAMETER_OVERRIDES_FILE.read_text(encoding="utf-8"))
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise pytest.UsageError(
            f"{PARAMETER_OVERRIDES_FILE}: expected a mapping of chapter name to "
            f"parameters, got {type(overrides).__name__}."
        )

    for chapter, parameters in overrides.items():
        chapter_path = BOOK_DIR / f"{chapter}.md"
        if not (chapter_path.exists() and is_chapter(chapter_path)):
            raise pytest.UsageError(
                f"{PARAMETER_OVERRIDES_FILE}: {chapter!r} is not an executable "
                f"chapter: {chapter_path} is missing or has no jupytext front matter."
            )
        if not isinstance(parameters, dict) or not parameters:
            raise pytest.UsageError(
                f"{PARAMETER_OVERRIDES_FILE}: the entry for {chapter!r} must map "
                f"parameter names to values, got {parameters!r}."
            )
        for name, value in parameters.items():
            if not _is_python_literal(value):
                raise pytest.UsageError(
                    f"{PARAMETER_OVERRIDES_FILE}: {chapter}.{name} = {value!r} is "
                    "not a Python literal (number, string, bool, null, list or "
                    "mapping)."
                )
    return overrides


def _is_python_literal(value) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        return False


def assigned_names(source: str) -> set[str]:
    """Return the names that the top-level statements of ``source`` assign."""
    names = set()
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        elif isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        else:
            continue
        for target in targets:
            for node in ast.walk(target):
                if isinstance(node, ast.Name):
                    names.add(node.id)
    return names


def inject_parameters(notebook, chapter: str, parameters: dict) -> None:
    """Insert a cell assigning ``parameters`` after the cell tagged ``parameters``."""
    indices = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.metadata.get("tags", [])
    ]
    if len(indices) != 1:
        raise pytest.UsageError(
            f"{PARAMETER_OVERRIDES_FILE} sets parameters for {chapter!r}, so "
            f"{chapter}.md needs exactly one code cell tagged {PARAMETERS_TAG!r}. "
            f"It has {len(indices)}."
        )
    parameters_cell = notebook.cells[indices[0]]

    unknown = sorted(set(parameters) - assigned_names(parameters_cell.source))
    if unknown:
        raise pytest.UsageError(
            f"{PARAMETER_OVERRIDES_FILE} sets {', '.join(unknown)} for {chapter!r}, "
            f"but the parameters cell of {chapter}.md assigns no such name."
        )

    lines = [f"# Test-size parameters injected from {PARAMETER_OVERRIDES_FILE.name}"]
    lines += [f"{name} = {value!r}" for name, value in parameters.items()]
    injected_cell = nbformat.v4.new_code_cell(
        "\n".join(lines), metadata={"tags": [INJECTED_TAG]}
    )
    notebook.cells.insert(indices[0] + 1, injected_cell)


class ChapterFile(IPyNbFile):
    """nbval collector for a jupytext MyST chapter, one test item per code cell."""

    def collect(self):
        chapter = self.path.stem
        self.nb = jupytext.read(self.path)
        parameters = load_parameter_overrides().get(chapter)
        if parameters:
            inject_parameters(self.nb, chapter, parameters)

        code_cells = [cell for cell in self.nb.cells if cell.cell_type == "code"]
        for cell_num, cell in enumerate(code_cells):
            # Same options as nbval's own collector: tags first, then comment
            # markers such as "# NBVAL_SKIP", then the run's default.
            options = defaultdict(bool, find_metadata_tags(cell.metadata))
            options.update(find_comment_markers(cell.source))
            options.setdefault("check", self.compare_outputs)
            yield IPyNbCell.from_parent(
                self,
                name=f"Cell {cell_num}",
                cell_num=cell_num,
                cell=cell,
                options=options,
            )


BROWSER_MARKER = "browser"


def pytest_addoption(parser):
    parser.addoption(
        "--book-html",
        default=None,
        metavar="DIR",
        help="folder of a built book (such as book/_build/html) for the browser "
        "tests in tests/test_browser.py, which are deselected without it",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{BROWSER_MARKER}: opens the built book in Chromium; needs --book-html",
    )


def pytest_collection_modifyitems(config, items):
    # The browser tests check a built book, which a plain `pytest` run has not
    # built yet, so they run only when given one.
    if config.getoption("--book-html"):
        return
    browser_items = [item for item in items if item.get_closest_marker(BROWSER_MARKER)]
    if browser_items:
        config.hook.pytest_deselected(items=browser_items)
        items[:] = [item for item in items if item not in browser_items]


def pytest_report_header(config):
    if not config.getoption("--book-html"):
        return "browser tests: deselected (give --book-html DIR to run them)"
    return f"browser tests: book in {config.getoption('--book-html')}"


def pytest_collect_file(file_path: Path, parent):
    option = parent.config.option
    if (option.nbval or option.nbval_lax) and is_chapter(file_path):
        return ChapterFile.from_parent(parent, path=file_path)
    return None


def pytest_ignore_collect(collection_path: Path, config):
    # Notebooks under book/ are executed copies (papermill or Jupyter output),
    # never sources, so testing them could pass on stale code.
    if collection_path.suffix == ".ipynb" and BOOK_DIR in collection_path.parents:
        return True
    return None
