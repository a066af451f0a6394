"""Sphinx configuration: the API reference, built from the numpydoc docstrings.

Build from the repository root (warnings are errors, as scripts/test.sh runs it)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sphinx import addnodes

if TYPE_CHECKING:
    from docutils import nodes
    from sphinx.application import Sphinx

ROOT = Path(__file__).resolve().parents[1]
# `annserve` is a namespace package over three source roots: import from the tree even
# when the package is not installed editable.
for root in ("src", "server", "client"):
    sys.path.insert(0, str(ROOT / root))

project = "annserve"
author = "annserve developers"
copyright = "annserve developers"  # noqa: A001
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]
templates_path = ["_templates"]
exclude_patterns = ["_build"]

autosummary_generate = True  # stub pages for every module, into api/generated/
autosummary_ignore_module_all = True  # sub-packages listed whether or not in __all__
autodoc_member_order = "bysource"
autodoc_typehints = "signature"  # numpydoc texts carry no types: annotations say them
autodoc_default_options = {"show-inheritance": True}
numpydoc_show_class_members = False  # autodoc documents members; no second table
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
python_use_unqualified_type_names = True  # links by full name, shown by the short one

html_theme = "furo"
html_title = "annserve API reference"


# Annotations are strings (``from __future__ import annotations``) naming classes that a
# module imports, often only under ``TYPE_CHECKING``: Sphinx looks such a bare name up by
# suffix, which is ambiguous (``Split`` of the client and of the server are two classes;
# a package's re-export is a second target). Resolve it as Python would, from the
# module's own imports, to the documented full name of that object.


def public_name(obj: object) -> str | None:
    """Return ``obj``'s documented full name.

    That of the nearest public package that exports it when it is defined in a private
    module (``annserve.client._assemble.CSRArrays`` -> ``annserve.client.CSRArrays``).
    """
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname:
        return None
    parts = module.split(".")
    while any(part.startswith("_") for part in parts[1:]):
        parts.pop()
    package = ".".join(parts)
    if package != module and getattr(importlib.import_module(package), qualname, None) is obj:
        return f"{package}.{qualname}"
    return f"{module}.{qualname}"


@cache
def imported_names(module: str) -> dict[str, str]:
    """Map each name ``module`` imports from annserve to its object's documented name."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return {}
    names = {}
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] != "annserve":
                continue
            for alias in node.names:
                obj = getattr(importlib.import_module(node.module), alias.name, None)
                if full := public_name(obj):
                    names[alias.asname or alias.name] = full
    return names


@cache
def documented_name(target: str) -> str | None:
    """Return the documented full name of a dotted target in a private module."""
    module, _, name = target.rpartition(".")
    try:
        return public_name(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return None


def qualify_imported_names(app: Sphinx, doctree: nodes.document) -> None:
    """Point each Python cross-reference at the full name of the object it means."""
    for ref in doctree.findall(addnodes.pending_xref):
        if ref.get("refdomain") != "py":
            continue
        target, module = ref.get("reftarget", ""), ref.get("py:module")
        if module and "." not in target:
            full = imported_names(module).get(target)
        elif target.startswith("annserve.") and "._" in target:
            full = documented_name(target)
        else:
            full = None
        if full:
            ref["reftarget"] = full
            ref["refspecific"] = False


def setup(app: Sphinx) -> None:
    """Register the cross-reference fix (Sphinx calls this for conf.py)."""
    app.connect("doctree-read", qualify_imported_names)
