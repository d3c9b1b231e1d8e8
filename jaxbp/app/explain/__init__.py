"""`jaxbp explain`: the source texts' worked examples as one self-contained HTML page."""
from __future__ import annotations

import os

from jaxbp.app.explain.examples import EXAMPLES
from jaxbp.app.explain.html import render_page

PAGE_FILE = "explain.html"


class UnknownExample(ValueError):
    """An example name that `EXAMPLES` does not hold."""


def write_example_page(name: str, out_dir: str) -> str:
    """Computes example `name` with the hand rule and writes `out_dir/explain.html`.

    Returns:
      The page's path.

    Raises:
      UnknownExample: `name` is not one of `EXAMPLES`; nothing is written.
      OSError: `out_dir` cannot be created or written.
    """
    if name not in EXAMPLES:
        raise UnknownExample(f"unknown example {name!r}; known: {', '.join(sorted(EXAMPLES))}")
    page = render_page(EXAMPLES[name]())
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PAGE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
