"""Small pure functions that turn a worked example into one self-contained HTML page.

No script, no web font, nothing fetched: styles are inline or in one <style> block, and a
step's images (`Step.images`) come already inline, so the page reads the same offline. Every
symbol and caption goes through `html.escape`. A number that is an entry of a recorded array
carries it as `data-source` (cells, equation values) or in `data-terms` (an equation's terms
as JSON), so that a test can read the page back against the arrays.
"""
from __future__ import annotations

import json
from html import escape
from typing import Sequence

import numpy as np

from jaxbp.app.explain.examples import Equation, Example, Grid, Step, Term

# ColorBrewer RdBu ends: dark enough to read as a sign, light enough under black text.
NEGATIVE, POSITIVE = (103, 169, 207), (239, 138, 98)

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } .source { color: #555; margin-top: 0; }
section { border-top: 1px solid #ddd; padding-top: 0.5rem; margin-top: 1.5rem; }
.grids { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.85rem; color: #444; max-width: 16rem; }
table.grid { border-collapse: collapse; margin-bottom: 0.3rem; }
table.grid td { border: 1px solid #888; width: 3.6rem; height: 2.6rem; text-align: center;
                vertical-align: middle; padding: 0.1rem; }
td .sym { display: block; font-size: 0.75rem; color: #333; font-style: italic; }
td .num { display: block; font-weight: 600; font-family: ui-monospace, monospace; }
.eq { font-family: ui-monospace, monospace; margin: 0.35rem 0; }
.eq .numbers { color: #555; }
.eq .value { font-weight: 700; }
.legend { font-size: 0.85rem; color: #444; }
""".strip()


def format_number(value: float) -> str:
    """A cell's number: at most six significant digits, no trailing zeros, no "-0"."""
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


def cell_colour(value: float, scale: float) -> str:
    """Background of a cell: white at zero, towards red above and blue below, full at ±scale."""
    if scale <= 0 or value == 0:
        return "rgb(255, 255, 255)"
    share = min(abs(value) / scale, 1.0)
    end = POSITIVE if value > 0 else NEGATIVE
    r, g, b = (round(255 + (c - 255) * share) for c in end)
    return f"rgb({r}, {g}, {b})"


def _source(where: str) -> str:
    return f' data-source="{escape(where)}"' if where else ""


def render_grid(grid: Grid) -> str:
    """One array as a table: each cell its symbol over its number, coloured by its sign."""
    scale = float(np.max(np.abs(grid.values), initial=0.0))
    sources = grid.sources or [[""] * len(row) for row in grid.symbols]
    rows = []
    for symbols, values, wheres in zip(grid.symbols, grid.values, sources):
        cells = "".join(
            f'<td style="background: {cell_colour(float(v), scale)}" data-symbol="{escape(s)}" '
            f'data-value="{float(v)!r}"{_source(where)}><span class="sym">{escape(s)}</span>'
            f'<span class="num">{format_number(float(v))}</span></td>'
            for s, v, where in zip(symbols, values, wheres))
        rows.append(f"<tr>{cells}</tr>")
    return (f'<figure><table class="grid">{"".join(rows)}</table>'
            f"<figcaption>{escape(grid.caption)}</figcaption></figure>")


def _factor(value: float) -> str:
    text = format_number(value)
    return f"({text})" if value < 0 else text


def _symbols(term: Term) -> str:
    return escape(term.left) + (f"·{escape(term.right)}" if term.right else "")


def _numbers(term: Term) -> str:
    return _factor(term.left_value) + (f"·{_factor(term.right_value)}" if term.right else "")


def _term_sources(equation: Equation) -> str:
    """`data-terms`: each term's numbers and sources as JSON, where any term has a source."""
    if not any(t.left_source or t.right_source for t in equation.terms):
        return ""
    terms = [[t.left_source, t.left_value, t.right_source, t.right_value]
             for t in equation.terms]
    return f' data-terms="{escape(json.dumps(terms))}"'


def render_equation(equation: Equation) -> str:
    """`lhs = a·b + … = (numbers)·(numbers) + … = value`, symbols first, then numbers."""
    if not equation.terms:
        symbols, numbers = "0", ""
    else:
        symbols = " + ".join(_symbols(t) for t in equation.terms)
        numbers = " + ".join(_numbers(t) for t in equation.terms)
        numbers = f' = <span class="numbers">{numbers}</span>'
    return (f'<div class="eq" data-lhs="{escape(equation.lhs)}" data-value="{equation.value!r}"'
            f"{_source(equation.source)}{_term_sources(equation)}>"
            f"{escape(equation.lhs)} = {symbols}{numbers} = "
            f'<span class="value">{format_number(equation.value)}</span></div>')


def render_step(step: Step, level: int = 2) -> str:
    """A step as a section under an `<h{level}>` heading: prose, grids, equations."""
    grids = "".join(render_grid(g) for g in step.grids)
    grids = f'<div class="grids">{grids}</div>' if grids else ""
    equations = "".join(render_equation(e) for e in step.equations)
    images = f'<div class="grids">{"".join(step.images)}</div>' if step.images else ""
    return (f"<section><h{level}>{escape(step.heading)}</h{level}><p>{escape(step.text)}</p>"
            f"{images}{grids}{equations}</section>")


def render_page(example: Example, legend: Sequence[str] = (
        "Cell colours: white is zero, red positive, blue negative, each table scaled to its "
        "largest magnitude.",
        "Every number is the output of jaxbp's hand-derived rule (jaxbp.layers.conv through "
        "jax.vjp); the sums beside them only spell it out.")) -> str:
    """The whole page: title, source, legend, then each step."""
    notes = "".join(f"<p>{escape(line)}</p>" for line in legend)
    steps = "".join(render_step(s) for s in example.steps)
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><title>{escape(example.title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(example.title)}</h1>"
            f'<p class="source">From {escape(example.source)}.</p>'
            f'<div class="legend">{notes}</div>{steps}</body></html>\n')
