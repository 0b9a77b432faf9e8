"""Sphinx configuration of the scatac-dist docs (``make docs``).

Why this toolchain: it is the scverse stack (anndata, scanpy, scvi-tools, muon and the scverse
cookiecutter use it): Sphinx with MyST Markdown (``myst-nb`` also executes notebooks),
``sphinx-book-theme``, autodoc + autosummary + napoleon for the API pages, which are built
from our numpydoc docstrings, and ``sphinx-click`` for the command line, generated from the
click definitions. Users of those packages find the docs laid out as they expect, and
nothing is written twice: the API and CLI pages come from the code, the architecture,
deployment and benchmark pages include the Markdown files kept beside the code.

The tutorial (``tutorial.md``, a MyST-NB text notebook) is executed on every build, on the
real BM0828 10x folder in ``../shared/data`` (or ``$SCATAC_DIST_DATA``); a failing cell
fails the build. Warnings are errors (``sphinx-build -W``, see the Makefile).
"""

from __future__ import annotations

from importlib import metadata

project = "scatac-dist"
author = "the scatac-dist developers"
copyright = "2026, the scatac-dist developers"
try:
    release = metadata.version("scatac-dist")
except metadata.PackageNotFoundError:
    release = "0+unknown"
version = release

extensions = [
    "myst_nb",  # MyST Markdown pages and executed notebooks (brings myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpydoc-style sections (Parameters, Returns, Raises)
    "sphinx.ext.viewcode",
    "sphinx_click",
    "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "jupyter_execute", "Thumbs.db", ".DS_Store", "**/_readme_notes/**",
                    "**.ipynb_checkpoints"]

# -- MyST ---------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# -- MyST-NB: the tutorial runs on every build --------------------------------------------
nb_execution_mode = "force"
nb_execution_timeout = 1800  # seconds per cell; the whole tutorial takes a few minutes
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True  # and its traceback is printed in the build log
nb_merge_streams = True
nb_output_stderr = "remove"  # progress bars and Dask's worker logs; results are on stdout

# -- autodoc / autosummary / napoleon -----------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
# Our docstrings name the store slots a function reads and writes (GUIDE: "numpydoc docstrings
# that say which store slots a function reads and writes"); feature selection lists its flavors.
napoleon_custom_sections = ["Reads", "Writes", "Flavors"]

# No intersphinx: CI builds offline, and a failed inventory fetch is a warning (-W: an error).

# -- HTML ---------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "scatac-dist"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []

# copybutton: strip shell and Python prompts
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


# -- sphinx-click -------------------------------------------------------------------------
# Click help texts are plain text, but sphinx-click emits them as reStructuredText, where a
# formula such as "|P - W1|^2" (scatac-dist sccase --alpha) reads as a substitution reference.
# Escape such bars so that help texts render as written.
import re  # noqa: E402

_BAR = re.compile(r"(?<!\\)\|(?=\S)")


def _escape_bars(app, ctx, lines: list[str]) -> None:
    for i, line in enumerate(lines):
        if not line.lstrip().startswith(":"):  # leave field lists such as ":options: a | b" alone
            lines[i] = _BAR.sub(r"\\|", line)


def setup(app):
    for event in ("sphinx-click-process-description", "sphinx-click-process-options",
                  "sphinx-click-process-arguments", "sphinx-click-process-epilog"):
        app.connect(event, _escape_bars)
