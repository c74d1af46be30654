"""Build the reproducibility page from the execution of the chapters themselves.

Three sources, none written by hand:

* myst-nb's execution data for each chapter: when it finished and how long the
  whole notebook took, kernel start included;
* a record that the chapter's own kernel publishes in a hidden last cell, which
  this extension appends to every Markdown notebook as it is read (see
  ``cdlib.provenance``): package versions, Python, machine, threads and the seed
  of torch's global generator;
* the executed code, scanned for the seeds passed to ``manual_seed``, ``seed``,
  ``default_rng`` and ``RandomState``, as written, together with the
  parameters whose name contains ``seed``.

The ``{reproducibility-report}`` directive renders them. Its page is moved to
the end of the reading order, so that every chapter has executed before it is
read, and it is re-read whenever a chapter is.
"""

import ast
import datetime
import importlib.metadata
import json
import subprocess
from pathlib import Path

import nbformat
from myst_nb.core.read import is_myst_markdown_notebook
from myst_nb.sphinx_ import NbMetadataCollector
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from chapter_parameters import executable_chapters, has_directive

LOGGER = logging.getLogger(__name__)

# Must match cdlib.provenance.MIME_TYPE. The extension does not import cdlib, so
# that the book builds with any kernel in which cdlib is installed.
MIME_TYPE = "application/vnd.cdlib.provenance+json"
RECORD_TAG = "provenance-record"
DIRECTIVE = "reproducibility-report"
RECORD_CELL = f"""

```{{code-cell}} ipython3
:tags: [remove-cell, {RECORD_TAG}]

import cdlib.provenance

cdlib.provenance.display_record()
```
"""
SEED_FUNCTIONS = {"manual_seed", "seed", "default_rng", "RandomState"}
BUILD_TOOLS = ("jupyter-book", "sphinx", "myst-nb", "sphinx-book-theme", "nbclient")


def append_record_cell(app: Sphinx, docname: str, source: list[str]) -> None:
    """Append the hidden cell that publishes the kernel's record to every notebook."""
    if is_myst_markdown_notebook(source[0]):
        source[0] = source[0].rstrip("\n") + "\n" + RECORD_CELL


def find_seeds(cells) -> list[tuple[str, str]]:
    """Return (function, argument) for every seeding call in the code cells, as written.

    The cells are notebook code cells; the cell that publishes the record is skipped.
    """
    seeds = []
    for cell in cells:
        if RECORD_TAG in cell.metadata.get("tags", []):
            continue
        try:
            module = ast.parse(cell.source)
        except SyntaxError:
            # IPython magics are not Python; such a cell seeds nothing we can read.
            continue
        calls = [
            node for node in ast.walk(module) if isinstance(node, ast.Call) and node.args
        ]
        # ast.walk goes breadth first, so sort the calls into reading order.
        for node in sorted(calls, key=lambda call: (call.lineno, call.col_offset)):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(
                function, "id", None
            )
            if name in SEED_FUNCTIONS:
                seeds.append(
                    (
                        ast.get_source_segment(cell.source, function),
                        ast.get_source_segment(cell.source, node.args[0]),
                    )
                )
    return seeds


def seed_parameters(cells) -> list[tuple[str, str]]:
    """Return (name, value) of each assignment to a name containing "seed" in the
    cell tagged ``parameters``."""
    found = []
    for cell in cells:
        if "parameters" not in cell.metadata.get("tags", []):
            continue
        for statement in ast.parse(cell.source).body:
            if isinstance(statement, ast.Assign):
                for target in statement.targets:
                    if isinstance(target, ast.Name) and "seed" in target.id:
                        found.append(
                            (target.id, ast.get_source_segment(cell.source, statement.value))
                        )
    return found


def read_record(notebook) -> dict | None:
    """Return the record published by the notebook's hidden cell, or None."""
    for cell in notebook.cells:
        if RECORD_TAG not in cell.metadata.get("tags", []):
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if MIME_TYPE in data:
                record = data[MIME_TYPE]
                return json.loads(record) if isinstance(record, str) else dict(record)
    return None


def source_revision(folder: Path) -> str:
    """Return the git commit of ``folder``, marked when the work tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=folder, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout, or git is not installed)"
    return f"`{commit}`" + (", with uncommitted changes" if changes else "")


def _utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return lines + [""]


def _agreed(records: dict[str, dict], read) -> str:
    """Return the value that ``read`` takes in every record, or each value per chapter."""
    values = {}
    for docname, record in records.items():
        values.setdefault(str(read(record)), []).append(docname)
    if len(values) == 1:
        return next(iter(values))
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in values.items())


class ChapterRun:
    """The execution facts of one chapter: myst-nb timing, kernel record and seeds."""

    def __init__(self, docname: str, exec_data: dict, notebook):
        self.docname = docname
        self.exec_data = exec_data
        self.record = read_record(notebook)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        self.seeds = find_seeds(code_cells)
        self.seed_parameters = seed_parameters(code_cells)


def collect_runs(app: Sphinx) -> tuple[list[ChapterRun], list[str]]:
    """Return the runs of every executed chapter and the chapters lacking a record."""
    env = app.env
    output_folder = Path(env.mystnb_config.output_folder)
    runs, missing = [], []
    for docname, _ in executable_chapters(app):
        exec_data = NbMetadataCollector.get_exec_data(env, docname)
        notebook_path = output_folder / f"{docname}.ipynb"
        if not exec_data or not exec_data["succeeded"] or not notebook_path.exists():
            missing.append(docname)
            continue
        notebook = nbformat.read(notebook_path, as_version=4)
        run = ChapterRun(docname, exec_data, notebook)
        if run.record is None:
            missing.append(docname)
            continue
        runs.append(run)
    return runs, missing


def runs_table(runs: list[ChapterRun]) -> list[str]:
    rows = []
    for run in runs:
        end = run.exec_data["mtime"]
        runtime = run.exec_data["runtime"]
        rows.append(
            [
                f"{{doc}}`{run.docname}`",
                _utc(end - runtime),
                _utc(end),
                f"{runtime:.1f}",
                str(run.record["torch_threads"]),
            ]
        )
    return _table(
        ["Chapter", "Started (UTC)", "Finished (UTC)", "Run time (s)", "torch threads"],
        rows,
    )


def software_table(runs: list[ChapterRun]) -> list[str]:
    records = {run.docname: run.record for run in runs}
    packages = []
    for record in records.values():
        packages += [name for name in record["packages"] if name not in packages]
    rows = [["Python", _agreed(records, lambda record: record["python"]), "kernel"]]
    for name in packages:
        version = _agreed(records, lambda record: record["packages"].get(name))
        rows.append([name, "not installed" if version == "None" else version, "kernel"])
    rows += [[name, _version(name), "build"] for name in BUILD_TOOLS]
    return _table(["Software", "Version", "Where"], rows)


def machine_table(runs: list[ChapterRun]) -> list[str]:
    records = {run.docname: run.record for run in runs}

    def thread_variables(record):
        variables = record["thread_variables"]
        return ", ".join(f"{key}={value}" for key, value in variables.items()) or "unset"

    rows = [
        ["Platform", _agreed(records, lambda record: record["platform"])],
        ["CPU", _agreed(records, lambda record: record["cpu"])],
        ["Logical CPUs", _agreed(records, lambda record: record["logical_cpus"])],
        ["CPUs available to the kernel", _agreed(records, lambda r: r["usable_cpus"])],
        ["Memory (GiB)", _agreed(records, lambda record: record["memory_gib"])],
        ["torch intra-op threads", _agreed(records, lambda r: r["torch_threads"])],
        ["torch inter-op threads", _agreed(records, lambda r: r["torch_interop_threads"])],
        ["Thread variables", _agreed(records, thread_variables)],
        ["Kernel's Python", _agreed(records, lambda record: f"`{record['executable']}`")],
    ]
    return _table(["Machine", "Value"], rows)


def seeds_table(runs: list[ChapterRun]) -> list[str]:
    rows = []
    for run in runs:
        entries = [
            (f"parameter `{name}`", f"`{value}`") for name, value in run.seed_parameters
        ]
        by_function = {}
        for function, argument in run.seeds:
            arguments = by_function.setdefault(function, [])
            if argument not in arguments:
                arguments.append(argument)
        entries += [
            (f"`{function}`", ", ".join(f"`{argument}`" for argument in arguments))
            for function, arguments in by_function.items()
        ]
        entries.append(
            (
                "torch's global generator (initial seed)",
                f"`{run.record['torch_default_seed']}`",
            )
        )
        for index, (source, value) in enumerate(entries):
            chapter = f"{{doc}}`{run.docname}`" if index == 0 else ""
            rows.append([chapter, source, value])
    return _table(["Chapter", "Seeded by", "Seeds"], rows)


def report_markdown(app: Sphinx, runs: list[ChapterRun]) -> str:
    lines = [
        "## Chapter runs",
        "",
        "Times come from myst-nb, which measures each notebook's execution from "
        "the start of its kernel to the end of its last cell.",
        "",
        *runs_table(runs),
        "## Software",
        "",
        "Versions under *kernel* were read by each chapter's kernel; a value that "
        "differed between chapters is listed per chapter. Versions under *build* "
        "are those of the process that built the book.",
        "",
        *software_table(runs),
        "## Machine",
        "",
        *machine_table(runs),
        "## Seeds",
        "",
        "Every call that seeds a random number generator in the executed code, "
        "with its argument as written, and the parameters named after a seed. "
        "The last row of each chapter is the initial seed of torch's global "
        "generator, read by the kernel after the chapter ran: a chapter that "
        "does not call `torch.manual_seed` gets a random one, which is harmless "
        "when it draws every random number from its own `torch.Generator`.",
        "",
        *seeds_table(runs),
        "## Source",
        "",
        f"Built from commit {source_revision(Path(app.srcdir))}.",
        "",
    ]
    return "\n".join(lines)


class ReproducibilityReportDirective(SphinxDirective):
    """Render the execution facts of every chapter, in book order."""

    has_content = False

    def run(self):
        runs, missing = collect_runs(self.env.app)
        for docname in missing:
            LOGGER.warning(
                f"No execution record for chapter {docname!r}: it did not run in "
                "this build. The reproducibility page needs every chapter executed "
                "(execute_notebooks: force, and build with --all).",
                location=self.get_location(),
            )
        if not runs:
            return []
        return self.parse_text_to_nodes(
            report_markdown(self.env.app, runs), allow_section_headings=True
        )


def read_report_pages_last(app: Sphinx, env, docnames: list[str]) -> None:
    """Move the pages with a report to the end of the reading order."""
    report_pages = [name for name in docnames if has_directive(app, name, DIRECTIVE)]
    for name in report_pages:
        docnames.remove(name)
    docnames.extend(report_pages)


def reread_reports_with_chapters(app: Sphinx, env, added, changed, removed):
    """Re-read the report pages whenever a chapter is read again."""
    chapters = {docname for docname, _ in executable_chapters(app)}
    if (added | changed) & chapters:
        return [name for name in env.found_docs if has_directive(app, name, DIRECTIVE)]
    return []


def setup(app: Sphinx) -> dict:
    app.add_directive(DIRECTIVE, ReproducibilityReportDirective)
    app.connect("source-read", append_record_cell)
    app.connect("env-get-outdated", reread_reports_with_chapters)
    app.connect("env-before-read-docs", read_report_pages_last)
    # The report pages must be read after the chapters, one at a time.
    return {"parallel_read_safe": False, "parallel_write_safe": True}
