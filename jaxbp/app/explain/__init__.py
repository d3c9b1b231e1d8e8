"""`jaxbp explain`: backpropagation as one self-contained HTML page, for a config's own
network (`write_network_page`) or a source text's worked example (`write_example_page`)."""
from __future__ import annotations

import errno
import os
from typing import Callable, Mapping, Optional

from jaxbp.app.explain.examples import EXAMPLES
from jaxbp.app.explain.html import render_page
from jaxbp.app.explain.network import explain, write_npz
from jaxbp.app.explain.page import render_network_page

PAGE_FILE = "explain.html"


class UnknownExample(ValueError):
    """An example name that `EXAMPLES` does not hold."""


def check_writable(out_dir: str) -> None:
    """Raises the OSError that creating and writing `out_dir` would raise, before the work
    that fills it: its nearest existing ancestor must be a writable folder. Creates
    nothing."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _write_page(page: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PAGE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


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
    return _write_page(render_page(EXAMPLES[name]()), out_dir)


def write_network_page(cfg: Mapping, name: str, out_dir: str, index: int = 0,
                       run_dir: Optional[str] = None, echo: Callable = print) -> str:
    """Records test example `index` through the config's network (`network.explain`) and
    writes `out_dir/deltas.npz` and `out_dir/explain.html`; `name` titles the page.

    Returns:
      The page's path.

    Raises:
      RunError: an index out of range, or a checkpoint that is missing or does not fit;
        nothing is written.
      OSError: `out_dir` cannot be created or written (checked first).
    """
    check_writable(out_dir)
    explained = explain(cfg, index, run_dir, echo)
    page = render_network_page(explained, name)
    path = _write_page(page, out_dir)
    write_npz(explained, out_dir)
    return path
