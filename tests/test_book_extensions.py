"""Tests of the book's Sphinx extensions in book/_ext/ that need no Sphinx build."""

import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path.insert(0, str(BOOK / "_ext"))

import chapter_parameters  # noqa: E402
import provenance  # noqa: E402
from chapter_parameters import ChapterParametersError, parse_parameters_cell  # noqa: E402

from cdlib.provenance import MIME_TYPE  # noqa: E402


def parse(source: str):
    return parse_parameters_cell(textwrap.dedent(source), "book/example.md")


def test_parameters_parsed_with_fields():
    parameters = parse(
        """\
        steps = 4000  # number of SGD updates; updates; integer >= 1
        rate = 0.5  # step; none; float > 0 and <= 1
        method = "cd"  # estimator; none;
                       # one of "cnce", "cd"
        """
    )

    assert [parameter.name for parameter in parameters] == ["steps", "rate", "method"]
    steps, rate, method = parameters
    assert steps.default == 4000
    assert steps.meaning == "number of SGD updates"
    assert steps.unit == "updates"
    assert steps.allowed == "integer >= 1"
    assert rate.default_source == "0.5"
    assert method.default == "cd"
    assert method.allowed == 'one of "cnce", "cd"'


def test_parameter_without_comment_rejected():
    with pytest.raises(ChapterParametersError, match="'width' has no comment"):
        parse(
            """\
            steps = 4000  # number of SGD updates; updates; integer >= 1
            width = 128
            """
        )


def test_comment_with_two_fields_rejected():
    with pytest.raises(ChapterParametersError, match="three non-empty fields"):
        parse("steps = 4000  # number of SGD updates; integer >= 1\n")


def test_comment_above_next_parameter_not_continuation():
    # A comment-only line in another column belongs to no parameter, so the
    # parameter below it still needs its own comment.
    with pytest.raises(ChapterParametersError, match="'width' has no comment"):
        parse(
            """\
            steps = 4000  # number of SGD updates; updates; integer >= 1
            # The network.
            width = 128
            """
        )


@pytest.mark.parametrize(
    "line, message",
    [
        ("steps = 0  # updates; none; integer >= 1", "violates '>= 1'"),
        ("steps = 2.5  # updates; none; integer >= 1", "not of type integer"),
        ("rate = 1.5  # rate; none; float > 0 and <= 1", "violates '<= 1'"),
        ("flag = 1  # switch; none; bool", "not of type bool"),
        ('method = "x"  # estimator; none; one of "cd", "cnce"', "not one of"),
        ("steps = 10  # updates; none; positive", "cannot read the allowed values"),
        ('name = "a"  # label; none; string > 1', "bounds apply only"),
    ],
)
def test_default_outside_allowed_rejected(line, message):
    with pytest.raises(ChapterParametersError, match=message):
        parse(line + "\n")


@pytest.mark.parametrize(
    "source, message",
    [
        ("steps = 2 * 1000  # updates; none; integer >= 1\n", "Python literal"),
        ("import math\n", "only contain assignments"),
        ("a = b = 1  # x; none; integer\n", "only contain assignments"),
    ],
)
def test_cell_statements_restricted(source, message):
    with pytest.raises(ChapterParametersError, match=message):
        parse(source)


def test_papermill_command_passes_strings_raw():
    parameters = parse(
        """\
        method = "adjusted_cd"  # estimator; none; string
        steps = 30  # updates; none; integer >= 1
        """
    )

    command = chapter_parameters.papermill_command("book/spiral.md", "spiral", parameters)

    assert command.splitlines()[0] == "jupytext --to ipynb --output - book/spiral.md \\"
    assert "papermill - spiral-run.ipynb --cwd book" in command
    assert "-r method adjusted_cd \\" in command
    assert command.endswith("-p steps 30")


def test_papermill_command_runs_chapter(tmp_path):
    # The generated command must be accepted by jupytext and papermill, on a
    # chapter small enough to run here.
    book = tmp_path / "book"
    book.mkdir()
    chapter = book / "tiny.md"
    chapter.write_text(
        textwrap.dedent(
            """\
            ---
            jupytext:
              text_representation:
                extension: .md
                format_name: myst
                format_version: 0.13
                jupytext_version: 1.19.6
            kernelspec:
              display_name: Python 3
              language: python
              name: python3
            ---

            ```{code-cell} ipython3
            :tags: [parameters]

            label = "a"  # label; none; string
            count = 2  # repetitions; none; integer >= 1
            ```

            ```{code-cell} ipython3
            assert label * count == "bb", label * count
            ```
            """
        )
    )
    parameters = chapter_parameters.read_chapter_parameters(chapter, "book/tiny.md")
    command = chapter_parameters.papermill_command("book/tiny.md", "tiny", parameters)
    command = command.replace("-r label a", "-r label b")
    bin_folder = Path(sys.executable).parent

    result = subprocess.run(
        ["bash", "-c", f"export PATH={bin_folder}:$PATH; {command}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tiny-run.ipynb").is_file()


def test_book_chapters_follow_convention():
    checked = 0
    for path in sorted(BOOK.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        if not chapter_parameters.is_myst_markdown_notebook(text):
            continue
        parameters = chapter_parameters.read_chapter_parameters(path, f"book/{path.name}")
        checked += parameters is not None
    assert checked >= 1


def code_cell(source: str, tags=()):
    return nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)})


def test_seeds_found_as_written():
    cells = [
        code_cell("seed = 0  # seed; none; integer >= 0", tags=["parameters"]),
        code_cell(
            "torch.manual_seed(0)\n"
            "g = torch.Generator().manual_seed(seed + 1)\n"
            "rng = np.random.default_rng(7)\n"
        ),
        code_cell("%timeit x = 1\n"),
        code_cell("torch.manual_seed(99)", tags=[provenance.RECORD_TAG]),
    ]

    assert provenance.find_seeds(cells) == [
        ("torch.manual_seed", "0"),
        ("torch.Generator().manual_seed", "seed + 1"),
        ("np.random.default_rng", "7"),
    ]
    assert provenance.seed_parameters(cells) == [("seed", "0")]


def test_seeds_in_reading_order():
    # The nested call comes first in the source but last breadth first.
    cells = [code_cell("run(torch.Generator().manual_seed(2))\ntorch.manual_seed(1)\n")]

    assert provenance.find_seeds(cells) == [
        ("torch.Generator().manual_seed", "2"),
        ("torch.manual_seed", "1"),
    ]


def test_record_read_from_output():
    record = {"python": "3.11.7"}
    cell = code_cell("cdlib.provenance.display_record()", tags=[provenance.RECORD_TAG])
    cell.outputs = [nbformat.v4.new_output("display_data", data={MIME_TYPE: record})]
    notebook = nbformat.v4.new_notebook(cells=[code_cell("x = 1"), cell])

    assert provenance.read_record(notebook) == record
    assert provenance.read_record(nbformat.v4.new_notebook()) is None


def test_extension_mime_type_matches_library():
    assert provenance.MIME_TYPE == MIME_TYPE


def test_record_cell_appended_to_notebooks_only():
    notebook = [(BOOK / "spiral.md").read_text(encoding="utf-8")]
    page = ["# Plain page\n\nNo code.\n"]

    provenance.append_record_cell(None, "spiral", notebook)
    provenance.append_record_cell(None, "page", page)

    assert notebook[0].rstrip().endswith("cdlib.provenance.display_record()\n```")
    assert provenance.RECORD_TAG in notebook[0]
    assert page == ["# Plain page\n\nNo code.\n"]
