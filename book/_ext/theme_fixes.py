"""Fix three defects of the HTML theme stack that show up in the browser.

NOTE: Sphinx 7.4 adds an inline script (``app.add_js_file(None, body=...)``)
twice when an extension registers it after the builder starts: once with the
file name None, and again, as it writes the pages, with the file name ''.
sphinx-thebe and sphinx-togglebutton register theirs that late, so every page
declared ``const THEBE_JS_URL`` twice and the browser raised "Identifier
'THEBE_JS_URL' has already been declared". Before the pages are written, each
registered script that the builder already has is removed from the registry.

pydata-sphinx-theme 0.17 logs "Got invalid theme mode" on every first visit
unless the template variable ``default_mode`` (in ``html_context``) is set, and
Jupyter Book does not set it. It is set here to "auto", the mode the theme then
falls back to.

Sphinx 7.4's search page builds each result's summary from the text of the
matching page, math included, and the search page does not run MathJax, so the
summaries showed TeX source such as ``\\(\\alpha_\\theta\\)``. A script added to
the search page only wraps ``Search.htmlToText`` (from Sphinx's searchtools.js)
so that every math element is replaced by the word "[formula]" before the
summary is cut.
"""

from sphinx.application import Sphinx


def set_default_mode(app: Sphinx, config) -> None:
    """Make the theme start in "auto" (light or dark, as the browser prefers)."""
    config.html_context.setdefault("default_mode", "auto")


def _key(filename, priority, attributes) -> tuple:
    return (filename or "", priority, tuple(sorted(attributes.items())))


def drop_registered_duplicates(app: Sphinx, env) -> None:
    """Remove from the registry each script the HTML builder already includes."""
    if app.builder.format != "html":
        return
    present = {
        _key(script.filename, script.priority, script.attributes)
        for script in app.builder.script_files
    }
    kept = []
    for filename, attributes in app.registry.js_files:
        attributes = dict(attributes)
        priority = attributes.pop("priority", 500)
        if _key(filename, priority, attributes) not in present:
            kept.append((filename, {**attributes, "priority": priority}))
    app.registry.js_files[:] = kept


# The search template loads searchtools.js, which defines the global ``Search``,
# after the registered scripts, so the wrapper is installed at DOMContentLoaded.
# Its listener is registered before the one of searchtools.js that starts the
# search, so it runs first.
SEARCH_SUMMARY_SCRIPT = """
document.addEventListener("DOMContentLoaded", () => {
  if (typeof Search === "undefined") return;
  const pageText = Search.htmlToText;
  Search.htmlToText = (htmlString, anchor) => {
    const page = new DOMParser().parseFromString(htmlString, "text/html");
    page.querySelectorAll(".math").forEach((element) => element.replaceWith("[formula]"));
    return pageText(page.documentElement.outerHTML, anchor);
  };
});
"""


def add_search_summary_script(app: Sphinx, pagename, templatename, context, doctree):
    """Add the math-free summary script to the search page, and to no other page."""
    if pagename == "search":
        app.add_js_file(None, body=SEARCH_SUMMARY_SCRIPT, priority=900)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", set_default_mode)
    app.connect("env-updated", drop_registered_duplicates)
    app.connect("html-page-context", add_search_summary_script)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
