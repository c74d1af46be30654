"""Generate the "run it yourself" page from the chapters' parameters cells.

A chapter's code cell tagged ``parameters`` contains the values that papermill can
replace. Every line in it assigns one Python literal to one name and ends with a
comment of three fields separated by semicolons, meaning; unit; allowed values::

    steps = 4000  # number of SGD updates; updates; integer >= 1
    method = "cd"  # estimator; none;
                   # one of "cnce", "cd", "adjusted_cd"

A comment may go on over the following comment-only lines whose ``#`` stands in
the same column as the first one. The unit ``none`` is shown as a dash. The
allowed values take one of these forms, and the default must satisfy them:

* ``one of A, B, ...`` with Python literals,
* ``TYPE`` with TYPE one of ``integer``, ``float``, ``bool``, ``string``,
* ``TYPE OP NUMBER`` or ``TYPE OP NUMBER and OP NUMBER`` with OP one of
  ``>``, ``>=``, ``<``, ``<=``, such as ``float > 0 and <= 1``.

The build fails with a message that names the chapter, the line and the rule
when a parameters cell breaks this convention, so the page cannot drift from
the chapters. The ``{chapter-parameters}`` directive renders, for each chapter
of the book that has a parameters cell, the papermill command and a table of
the parameters.
"""

import ast
import io
import math
import operator
import re
import shlex
import tokenize
from dataclasses import dataclass
from pathlib import Path

import jupytext
import yaml
from myst_nb.core.read import is_myst_markdown_notebook
from sphinx.application import Sphinx
from sphinx.errors import SphinxError
from sphinx.util.docutils import SphinxDirective

PARAMETERS_TAG = "parameters"
DIRECTIVE = "chapter-parameters"
NO_UNIT = "none"
TYPE_CHECKS = {
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "float": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    "bool": lambda value: isinstance(value, bool),
    "string": lambda value: isinstance(value, str),
}
COMPARISONS = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
BOUND = r"(>=|<=|>|<)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)"
RANGE_PATTERN = re.compile(
    rf"^(integer|float|bool|string)(?:\s+{BOUND}(?:\s+and\s+{BOUND})?)?$"
)
# File of the test-size parameters of the nbval run, in the book's folder.
TEST_SIZE_FILE = "_nbval_parameters.yml"


class ChapterParametersError(SphinxError):
    """A parameters cell that does not follow the documented convention."""

    category = "Chapter parameters error"


@dataclass(frozen=True)
class Parameter:
    """One line of a parameters cell: ``name = default  # meaning; unit; allowed``."""

    name: str
    default: object
    default_source: str
    meaning: str
    unit: str
    allowed: str
    line: int


def parse_parameters_cell(source: str, where: str) -> list[Parameter]:
    """Parse a parameters cell, raising ChapterParametersError on any broken rule.

    ``where`` names the cell in error messages, for example ``book/spiral.md``.
    """
    try:
        module = ast.parse(source)
    except SyntaxError as error:
        raise ChapterParametersError(
            f"{where}: the parameters cell is not valid Python: {error}"
        ) from error

    comments = _comments_by_line(source)
    code_lines = {
        line
        for statement in module.body
        for line in range(statement.lineno, statement.end_lineno + 1)
    }
    parameters = []
    for statement in module.body:
        name, value_node = _assignment(statement, where)
        try:
            default = ast.literal_eval(value_node)
        except ValueError as error:
            raise ChapterParametersError(
                f"{where}, line {statement.lineno}: {name} must be assigned a Python "
                "literal (number, string, bool, None, list or dict), because "
                "papermill can only replace literals."
            ) from error

        comment = _parameter_comment(statement, comments, code_lines)
        if comment is None:
            raise ChapterParametersError(
                f"{where}, line {statement.lineno}: parameter {name!r} has no comment. "
                "End the line with '# meaning; unit; allowed values', for example "
                "'steps = 4000  # number of SGD updates; updates; integer >= 1'."
            )
        fields = [field.strip() for field in comment.split(";")]
        if len(fields) != 3 or not all(fields):
            raise ChapterParametersError(
                f"{where}, line {statement.lineno}: the comment of {name!r} must have "
                f"three non-empty fields 'meaning; unit; allowed values', got "
                f"{comment!r}."
            )
        meaning, unit, allowed = fields
        check_allowed(default, allowed, f"{where}, line {statement.lineno}: {name}")
        parameters.append(
            Parameter(
                name=name,
                default=default,
                default_source=ast.get_source_segment(source, value_node),
                meaning=meaning,
                unit=unit,
                allowed=allowed,
                line=statement.lineno,
            )
        )
    if not parameters:
        raise ChapterParametersError(f"{where}: the parameters cell assigns nothing.")
    return parameters


def _assignment(statement: ast.stmt, where: str):
    """Return (name, value node) of ``name = value``, or raise for any other statement."""
    if (
        isinstance(statement, ast.Assign)
        and len(statement.targets) == 1
        and isinstance(statement.targets[0], ast.Name)
    ):
        return statement.targets[0].id, statement.value
    if (
        isinstance(statement, ast.AnnAssign)
        and isinstance(statement.target, ast.Name)
        and statement.value is not None
    ):
        return statement.target.id, statement.value
    raise ChapterParametersError(
        f"{where}, line {statement.lineno}: a parameters cell may only contain "
        "assignments 'name = literal', one per line."
    )


def _comments_by_line(source: str) -> dict[int, tuple[int, str]]:
    """Map each line number with a comment to (column of '#', text after '#')."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line, column = token.start
            comments[line] = (column, token.string[1:].strip())
    return comments


def _parameter_comment(statement, comments, code_lines) -> str | None:
    """Return the inline comment of ``statement`` joined with its continuation lines."""
    last_line = statement.end_lineno
    if last_line not in comments:
        return None
    column, text = comments[last_line]
    parts = [text]
    line = last_line + 1
    while line in comments and line not in code_lines and comments[line][0] == column:
        parts.append(comments[line][1])
        line += 1
    return " ".join(parts)


def check_allowed(default, allowed: str, where: str) -> None:
    """Raise ChapterParametersError unless ``allowed`` parses and admits ``default``."""
    if allowed.startswith("one of "):
        try:
            options = ast.literal_eval(f"[{allowed[len('one of '):]}]")
        except (ValueError, SyntaxError) as error:
            raise ChapterParametersError(
                f"{where}: 'one of' must be followed by Python literals separated "
                f"by commas, got {allowed!r}."
            ) from error
        if default not in options:
            raise ChapterParametersError(
                f"{where}: the default {default!r} is not one of {options!r}."
            )
        return

    match = RANGE_PATTERN.match(allowed)
    if match is None:
        raise ChapterParametersError(
            f"{where}: cannot read the allowed values {allowed!r}. Write 'one of A, "
            "B', or a type (integer, float, bool, string) optionally followed by "
            "bounds such as '> 0' or '>= 1 and <= 16'."
        )
    type_name = match.group(1)
    if not TYPE_CHECKS[type_name](default):
        raise ChapterParametersError(
            f"{where}: the default {default!r} is not of type {type_name}."
        )
    bounds = [match.group(index, index + 1) for index in (2, 4) if match.group(index)]
    for symbol, number in bounds:
        if type_name not in ("integer", "float"):
            raise ChapterParametersError(
                f"{where}: bounds apply only to integer and float, got {allowed!r}."
            )
        bound = float(number)
        if not (math.isfinite(default) and COMPARISONS[symbol](default, bound)):
            raise ChapterParametersError(
                f"{where}: the default {default!r} violates '{symbol} {number}'."
            )


def read_chapter_parameters(path: Path, where: str) -> list[Parameter] | None:
    """Return the parameters of the chapter at ``path``, or None if it has no such cell."""
    notebook = jupytext.read(path)
    cells = [
        cell
        for cell in notebook.cells
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.metadata.get("tags", [])
    ]
    if not cells:
        return None
    if len(cells) > 1:
        raise ChapterParametersError(
            f"{where}: {len(cells)} cells are tagged {PARAMETERS_TAG!r}; papermill "
            "uses only the first, so keep one."
        )
    return parse_parameters_cell(cells[0].source, where)


def papermill_command(where: str, chapter: str, parameters: list[Parameter]) -> str:
    """Return a shell command that runs the chapter with every parameter spelled out."""
    book_folder = str(Path(where).parent)
    lines = [
        f"jupytext --to ipynb --output - {shlex.quote(where)} \\",
        f"  | papermill - {shlex.quote(chapter + '-run.ipynb')} "
        f"--cwd {shlex.quote(book_folder)} \\",
    ]
    for index, parameter in enumerate(parameters):
        # -r passes the value as a string; -p parses numbers, True, False and None.
        option = "-r" if isinstance(parameter.default, str) else "-p"
        value = parameter.default if option == "-r" else repr(parameter.default)
        ending = " \\" if index < len(parameters) - 1 else ""
        lines.append(
            f"      {option} {parameter.name} {shlex.quote(str(value))}{ending}"
        )
    return "\n".join(lines)


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _allowed_markdown(allowed: str) -> str:
    """Return the allowed values with each option of 'one of' as inline code."""
    if not allowed.startswith("one of "):
        return allowed
    options = ast.literal_eval(f"[{allowed[len('one of '):]}]")
    return "one of " + ", ".join(f"`{option!r}`" for option in options)


def parameters_markdown(
    where: str,
    chapter: str,
    title: str,
    parameters: list[Parameter],
    test_size: dict | None,
) -> str:
    """Return the MyST Markdown of one chapter's section: table, command, test size."""
    lines = [
        f"## {title}",
        "",
        f"The parameters cell of {{doc}}`{chapter}` (`{where}`):",
        "",
        "| Parameter | Default | Meaning | Unit | Allowed values |",
        "| --- | --- | --- | --- | --- |",
    ]
    for parameter in parameters:
        unit = "–" if parameter.unit == NO_UNIT else parameter.unit
        cells = [
            f"`{parameter.name}`",
            f"`{parameter.default_source}`",
            parameter.meaning,
            unit,
            _allowed_markdown(parameter.allowed),
        ]
        lines.append("| " + " | ".join(_table_cell(cell) for cell in cells) + " |")
    lines += [
        "",
        "Run it with every parameter at its default, then change the values you want:",
        "",
        "```bash",
        papermill_command(where, chapter, parameters),
        "```",
        "",
    ]
    if test_size:
        overrides = ", ".join(f"`{name} = {value!r}`" for name, value in test_size.items())
        lines += [
            f"The test suite runs this chapter at test size, with {overrides} "
            f"(from `{Path(where).parent / TEST_SIZE_FILE}`).",
            "",
        ]
    return "\n".join(lines)


def book_order(app: Sphinx) -> list[str]:
    """Return the book's documents in table-of-contents order, then any others sorted."""
    site_map = getattr(app.env, "external_site_map", None)
    ordered = []
    if site_map is not None:
        pending = [site_map.root.docname]
        while pending:
            docname = pending.pop(0)
            if docname in ordered or docname not in site_map:
                continue
            ordered.append(docname)
            children = [
                item
                for subtree in site_map[docname].subtrees
                for item in subtree.items
                if isinstance(item, str)
            ]
            pending = children + pending
    return ordered + sorted(set(app.env.found_docs) - set(ordered))


def executable_chapters(app: Sphinx) -> list[tuple[str, Path]]:
    """Return (docname, path) of each Markdown notebook of the book, in book order."""
    chapters = []
    for docname in book_order(app):
        path = Path(app.env.doc2path(docname))
        if path.suffix == ".md" and is_myst_markdown_notebook(
            path.read_text(encoding="utf-8")
        ):
            chapters.append((docname, path))
    return chapters


def _relative_to_repository(app: Sphinx, path: Path) -> str:
    return str(path.relative_to(Path(app.srcdir).parent))


def validate_and_order(app: Sphinx, env, docnames: list[str]) -> None:
    """Check every chapter's parameters cell before any chapter runs, and move the
    pages with the directive to the end of the reading order."""
    for docname, path in executable_chapters(app):
        read_chapter_parameters(path, _relative_to_repository(app, path))

    pages = [name for name in docnames if has_directive(app, name, DIRECTIVE)]
    for name in pages:
        docnames.remove(name)
    docnames.extend(pages)


def has_directive(app: Sphinx, docname: str, directive: str) -> bool:
    """Return whether the Markdown source of ``docname`` uses ``directive``."""
    path = Path(app.env.doc2path(docname))
    return path.suffix == ".md" and f"{{{directive}}}" in path.read_text(
        encoding="utf-8"
    )


class ChapterParametersDirective(SphinxDirective):
    """Render the parameters of every chapter, in book order."""

    has_content = False

    def run(self):
        test_sizes = {}
        test_size_path = Path(self.env.srcdir) / TEST_SIZE_FILE
        if test_size_path.exists():
            test_sizes = yaml.safe_load(test_size_path.read_text(encoding="utf-8")) or {}
            self.env.note_dependency(str(test_size_path))

        sections = []
        for docname, path in executable_chapters(self.env.app):
            self.env.note_dependency(str(path))
            where = _relative_to_repository(self.env.app, path)
            parameters = read_chapter_parameters(path, where)
            if parameters is None:
                continue
            # The page is read after the chapters, so their titles are known.
            title = self.env.titles[docname].astext() if docname in self.env.titles else docname
            sections.append(
                parameters_markdown(
                    where, docname, title, parameters, test_sizes.get(docname)
                )
            )
        if not sections:
            raise self.error("No chapter of the book has a cell tagged 'parameters'.")
        return self.parse_text_to_nodes("\n".join(sections), allow_section_headings=True)


def setup(app: Sphinx) -> dict:
    app.add_directive(DIRECTIVE, ChapterParametersDirective)
    app.connect("env-before-read-docs", validate_and_order)
    # The page is read after the chapters, one document at a time.
    return {"parallel_read_safe": False, "parallel_write_safe": True}
