"""Fail an HTML build early unless MathJax is served from the built site.

The book sets ``mathjax_path`` to MathJax's npm package under ``.mathjax/`` at
the repository root, which ``html_static_path`` copies into ``_static/``, so the
pages render math with no network access. Without this check, a missing copy
would only show as raw TeX in the browser.
"""

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ConfigError

INSTALL_COMMAND = "npm install --prefix .mathjax mathjax@3.2.2"


def _js_filename(entry) -> str:
    """Return the file name of an ``html_js_files`` entry (a str or a tuple)."""
    return entry if isinstance(entry, str) else entry[0]


def record_mathjax_candidates(app: Sphinx, config) -> None:
    """Store where ``mathjax_path`` may lie, before Sphinx drops missing folders.

    Sphinx (7.4) removes html_static_path entries that do not exist, with a
    warning, in a config-inited handler of priority 800. This handler runs first,
    so the folder that should contain MathJax is still known at builder-inited.
    """
    app.local_mathjax_candidates = [
        Path(app.confdir, folder, config.mathjax_path).resolve()
        for folder in config.html_static_path
    ]


def check_local_mathjax(app: Sphinx) -> None:
    """Raise ConfigError if MathJax would come from a URL, be missing, or load twice."""
    if app.builder.format != "html":
        return

    mathjax_path = app.config.mathjax_path
    if "//" in mathjax_path:
        raise ConfigError(
            f"mathjax_path is a URL ({mathjax_path!r}), so math would not render "
            "offline. Set it to a file inside one of the html_static_path folders, "
            "such as 'mathjax/es5/tex-mml-chtml.js'."
        )

    candidates = app.local_mathjax_candidates
    if not any(path.is_file() for path in candidates):
        searched = " or ".join(str(path) for path in candidates) or "nothing"
        raise ConfigError(
            f"MathJax not found: mathjax_path {mathjax_path!r} should be {searched}. "
            f"Install it by running `{INSTALL_COMMAND}` in the repository root "
            "(scripts/setup.sh does this)."
        )

    # Jupyter Book adds every .js file found under html_static_path to every page
    # when the book has a _static folder, which would load each MathJax component.
    mathjax_folder = Path(mathjax_path).parts[0] + "/"
    injected = [
        _js_filename(entry)
        for entry in app.config.html_js_files
        if _js_filename(entry).startswith(mathjax_folder)
    ]
    if injected:
        raise ConfigError(
            f"{len(injected)} MathJax files (such as {injected[0]!r}) would be loaded "
            "on every page, because Jupyter Book adds every .js file under "
            "html_static_path to each page when book/_static exists. Move the "
            "files in book/_static to a folder with another name, add it to "
            "html_static_path and name its files in html_css_files or html_js_files."
        )


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", record_mathjax_candidates, priority=700)
    app.connect("builder-inited", check_local_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
