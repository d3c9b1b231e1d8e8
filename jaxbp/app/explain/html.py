"""Small pure functions that turn a worked example into one self-contained HTML page.

No script, no web font, no image: styles are inline or in one <style> block, so the page reads
the same offline. Every symbol and caption goes through `html.escape`.
"""
from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

from jaxbp.app.explain.examples import Equation, Example, Grid, Step

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


def render_grid(grid: Grid) -> str:
    """One array as a table: each cell its symbol over its number, coloured by its sign."""
    scale = float(np.max(np.abs(grid.values), initial=0.0))
    rows = []
    for symbols, values in zip(grid.symbols, grid.values):
        cells = "".join(
            f'<td style="background: {cell_colour(float(v), scale)}" data-symbol="{escape(s)}" '
            f'data-value="{float(v)!r}"><span class="sym">{escape(s)}</span>'
            f'<span class="num">{format_number(float(v))}</span></td>'
            for s, v in zip(symbols, values))
        rows.append(f"<tr>{cells}</tr>")
    return (f'<figure><table class="grid">{"".join(rows)}</table>'
            f"<figcaption>{escape(grid.caption)}</figcaption></figure>")


def _factor(value: float) -> str:
    text = format_number(value)
    return f"({text})" if value < 0 else text


def render_equation(equation: Equation) -> str:
    """`lhs = a·b + … = (numbers)·(numbers) + … = value`, symbols first, then numbers."""
    if not equation.terms:
        symbols, numbers = "0", ""
    else:
        symbols = " + ".join(f"{escape(t.left)}·{escape(t.right)}" for t in equation.terms)
        numbers = " + ".join(f"{_factor(t.left_value)}·{_factor(t.right_value)}"
                             for t in equation.terms)
        numbers = f' = <span class="numbers">{numbers}</span>'
    return (f'<div class="eq" data-lhs="{escape(equation.lhs)}" data-value="{equation.value!r}">'
            f"{escape(equation.lhs)} = {symbols}{numbers} = "
            f'<span class="value">{format_number(equation.value)}</span></div>')


def render_step(step: Step) -> str:
    grids = "".join(render_grid(g) for g in step.grids)
    grids = f'<div class="grids">{grids}</div>' if grids else ""
    equations = "".join(render_equation(e) for e in step.equations)
    return (f"<section><h2>{escape(step.heading)}</h2><p>{escape(step.text)}</p>"
            f"{grids}{equations}</section>")


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
