"""`jaxbp explain --example`: the worked numbers are the hand rule's, the sources' identities
hold term by term, the CLI's exits, and the page in a real headless browser."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import layers
from jaxbp.app.cli import main
from jaxbp.app.explain import PAGE_FILE, write_example_page
from jaxbp.app.explain.examples import (EXAMPLES, Grid, seed003, seed004, spread_and_pad,
                                        term_sum)
from jaxbp.app.explain.html import cell_colour, format_number, render_grid


class PageReader(HTMLParser):
    """Reads a page back: each table cell's symbol, data value and visible number, and each
    equation's left-hand side, value and text."""

    def __init__(self):
        super().__init__()
        self.cells, self.equations, self._open = [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td":
            self._open = {"symbol": attrs["data-symbol"], "value": float(attrs["data-value"]),
                          "text": ""}
            self.cells.append(self._open)
        elif tag == "div" and attrs.get("class") == "eq":
            self._open = {"value": float(attrs["data-value"]), "text": ""}
            self.equations[attrs["data-lhs"]] = self._open

    def handle_endtag(self, tag):
        if tag in ("td", "div"):
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data


def read_page(text: str) -> PageReader:
    reader = PageReader()
    reader.feed(text)
    return reader


@pytest.fixture(scope="module")
def seed004_page(tmp_path_factory) -> PageReader:
    path = write_example_page("seed004", str(tmp_path_factory.mktemp("explain")))
    return read_page(open(path, encoding="utf-8").read())


def rule_arrays():
    """Seed 004's numbers computed here, independently of the page: forward and VJP."""
    x = jnp.arange(1.0, 10.0, dtype=jnp.float64).reshape(1, 3, 3, 1)
    w = jnp.array([[1.0, -1.0], [2.0, 0.5]], jnp.float64).reshape(2, 2, 1, 1)
    delta = jnp.array([[1.0, -2.0], [0.5, 3.0]], jnp.float64).reshape(1, 2, 2, 1)
    y, pullback = jax.vjp(lambda a, k: layers.conv(a, k), x, w)
    dx, dw = pullback(delta)
    return y[0, :, :, 0], dx[0, :, :, 0], dw[:, :, 0, 0]


def test_seed004_page_numbers_are_the_rules_arrays(seed004_page):
    y, dx, dw = (np.asarray(a) for a in rule_arrays())
    cells = {c["symbol"]: c for c in seed004_page.cells}
    for name, array in (("G", y), ("δV", dx), ("∂E/∂W", dw)):
        for n, value in enumerate(array.ravel(), start=1):
            cell = cells[f"{name}{n}"]
            assert cell["value"] == pytest.approx(value, abs=1e-12), cell
            assert cell["text"].endswith(format_number(float(value)))
    assert seed004_page.equations["∂E/∂W1"]["value"] == pytest.approx(float(dw[0, 0]))
    assert seed004_page.equations["δV5"]["value"] == pytest.approx(float(dx[1, 1]))


def test_seed004_identities_term_by_term(seed004_page):
    steps = {s.heading: s for s in seed004().steps}
    kernel = {e.lhs: e for e in steps["3. Kernel gradient"].equations}
    inputs = {e.lhs: e for e in steps["4. Input delta"].equations}
    forward = {e.lhs: e for e in steps["1. Forward"].equations}
    symbols = lambda e: [f"{t.left}·{t.right}" for t in e.terms]  # noqa: E731
    assert symbols(forward["G1"]) == ["V1·W1", "V2·W2", "V4·W3", "V5·W4"]
    assert symbols(kernel["∂E/∂W1"]) == ["δG1·V1", "δG2·V2", "δG3·V4", "δG4·V5"]
    assert symbols(inputs["δV5"]) == ["δG1·W4", "δG2·W3", "δG3·W2", "δG4·W1"]
    assert symbols(inputs["δV1"]) == ["δG1·W1"]
    # dE/dW1 = 1·1 + (-2)·2 + 0.5·4 + 3·5, as the page spells it out.
    assert "1·1 + (-2)·2 + 0.5·4 + 3·5 = 14" in seed004_page.equations["∂E/∂W1"]["text"]
    for equation in [*forward.values(), *kernel.values(), *inputs.values()]:
        assert term_sum(equation) == pytest.approx(equation.value, abs=1e-12), equation.lhs


@pytest.mark.parametrize("make", [seed003, seed004])
def test_every_equation_sums_to_the_rules_value_and_the_check_passes(make):
    example = make()
    equations = [e for s in example.steps for e in s.equations]
    assert equations
    for equation in equations:
        assert term_sum(equation) == pytest.approx(equation.value, abs=1e-12), equation.lhs
    checks = [s.text for s in example.steps if "check" in s.heading.lower()]
    errors = [float(e) for t in checks for e in re.findall(r"(\d\.\de[+-]\d+) for", t)]
    assert len(errors) == 2 * len(checks) > 0 and max(errors) <= 1e-10


def test_seed003_stride_two_spreads_the_delta_with_zeros():
    delta = np.array([[1.0, -2.0], [0.5, 3.0]])
    padded, where = spread_and_pad(delta, (2, 2), 2, (4, 4))
    assert padded.shape == (5, 5)
    # One zero between neighbouring deltas, one zero of border for the 2×2 kernel.
    assert padded[1, 1] == 1.0 and padded[1, 3] == -2.0 and padded[3, 1] == 0.5
    assert padded[3, 3] == 3.0 and where[1][3] == (0, 1)
    assert np.count_nonzero(padded) == 4
    steps = {s.heading: s for s in seed003().steps}
    slide = {e.lhs: e for e in steps["Stride 2: the rotated kernel slides"].equations}
    assert [f"{t.left}·{t.right}" for t in slide["δx22"].terms] == [
        "δ11·w22", "0·w21", "0·w12", "0·w11"]
    assert len(slide) == 16


def test_cells_are_escaped_and_coloured_by_sign():
    grid = Grid("<caption & more>", np.array([[-2.0, 0.0, 1.0]]), (("<b>", "a", "c"),))
    page = render_grid(grid)
    assert "<b>" not in page and "&lt;b&gt;" in page and "&lt;caption &amp; more&gt;" in page
    assert cell_colour(0.0, 2.0) == "rgb(255, 255, 255)"
    red, blue = cell_colour(2.0, 2.0), cell_colour(-2.0, 2.0)
    assert red != blue and cell_colour(1.0, 2.0) not in (red, "rgb(255, 255, 255)")
    assert format_number(-0.0) == "0" and format_number(6.25) == "6.25"


def test_cli_writes_default_out_and_prints_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "--example", "seed004"]) == 0
    path = os.path.join("runs", "explain-seed004", PAGE_FILE)
    assert capsys.readouterr().out.strip() == path
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>")
    # Self-contained: nothing fetched from anywhere, nothing run.
    for outside in ("<script", "src=", "href=", "url(", "@import", "http"):
        assert outside not in text


def test_cli_unknown_example_and_unwritable_out_are_one_line(tmp_path, capsys):
    assert main(["explain", "--example", "seed999", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxbp: error: ")
    assert all(name in err for name in EXAMPLES) and not (tmp_path / "x").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["explain", "--example", "seed003", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxbp: error: ") and str(blocker) in err


def test_explain_without_example_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "configs/default.yaml"])
    assert exit_info.value.code == 2


BROWSER = shutil.which("chromium")


@pytest.mark.skipif(BROWSER is None, reason="no headless browser: `chromium` is not on PATH "
                                            "(apt-get install -y chromium)")
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_page_renders_in_a_headless_browser_without_console_errors(name, tmp_path):
    page = write_example_page(name, str(tmp_path))
    url = "file://" + os.path.abspath(page)
    base = [BROWSER, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1200,2000",
            f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "explain.png"
    run = subprocess.run([*base, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    # Console messages from the page come out as CONSOLE lines; a clean page has none.
    assert "CONSOLE" not in run.stderr and "Uncaught" not in run.stderr, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = read_page(dom.stdout)
    source = read_page(open(page, encoding="utf-8").read())
    assert len(rendered.cells) == len(source.cells) > 20
    assert rendered.equations.keys() == source.equations.keys()
