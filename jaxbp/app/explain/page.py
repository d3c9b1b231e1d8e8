"""The page of a recorded network: forward up to the loss, then the delta back down, layer by
layer, with heatmaps, each rule's own equation, worked steps and the check against autodiff.

Self-contained like the worked-example pages (`jaxbp.app.explain.html`): the heatmaps are
inline PNG `data:` URIs, the colour bars CSS gradients; no script, no font, nothing fetched.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from html import escape
from typing import Callable, List, Tuple

import numpy as np

from jaxbp import nn, registry
from jaxbp.app.explain.examples import Equation, Grid, Step, Term, source
from jaxbp.app.explain.html import STYLE, format_number, render_step
from jaxbp.app.explain.maps import colour_bar, heatmap
from jaxbp.app.explain.network import NPZ_FILE, Explained
from jaxbp.app.explain.worked import Layer, largest, spot, worked_steps
from jaxbp.app.model import RESIDUAL
from jaxbp.testing import TOLERANCE

NETWORK_STYLE = """
.map img { image-rendering: pixelated; display: block; border: 1px solid #ccc; }
.maps { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-end; margin: 0.5rem 0; }
.shown { color: #777; }
.bar { display: flex; align-items: center; gap: 0.4rem; font-size: 0.8rem; color: #444; }
.bar .ramp { display: inline-block; width: 9rem; height: 0.7rem; border: 1px solid #aaa; }
.swatch { display: inline-block; width: 0.8rem; height: 0.8rem; margin: 0 0.2rem 0 0.5rem;
          vertical-align: middle; }
table.rows { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
table.rows td, table.rows th { border-bottom: 1px solid #ddd; padding: 0.15rem 0.6rem;
                               text-align: left; }
table.rows td.n { text-align: right; font-family: ui-monospace, monospace; }
.size { display: inline-block; height: 0.7rem; background: #d6604d; }
blockquote.rule { margin: 0.5rem 0; padding: 0.4rem 0.8rem; background: #f6f6f6;
                  border-left: 3px solid #999; font-size: 0.92rem; }
.eq { overflow-wrap: anywhere; }
section.layer { border-top: 2px solid #bbb; }
h4 { margin-bottom: 0.2rem; }
""".strip()


def backward_equation(function: Callable) -> Tuple[str, str]:
    """The backward's equation as the rule's own docstring writes it: from "Backward" to the
    end of that paragraph (or, where the function's docstring has none, the paragraph of its
    module's docstring that speaks of the backward), whitespace joined; and where it was
    found. ("", "") when neither has one."""
    module = sys.modules.get(getattr(function, "__module__", ""), None)
    name = getattr(function, "__qualname__", getattr(function, "__name__", "?"))
    sources = [(function.__doc__, f"{function.__module__}.{name}"),
               (getattr(module, "__doc__", None), f"the module {function.__module__}")]
    for heading in (True, False):  # a "Backward" paragraph first, any mention after
        for doc, where in sources:
            for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc or "")):
                at = paragraph.find("Backward")
                if at < 0 and not heading and "backward" in paragraph.lower():
                    at = 0
                if at >= 0:
                    return " ".join(paragraph[at:].split()), where
    return "", ""


def _rule(type_: str) -> Callable:
    return nn.residual if type_ == RESIDUAL else registry.get(type_).hand


def _rule_html(function: Callable) -> str:
    text, where = backward_equation(function)
    if not text:
        return "<p>Its rule's docstring does not write out the backward.</p>"
    return (f'<blockquote class="rule">{escape(text)}<br><small>(from the docstring of '
            f"{escape(where)})</small></blockquote>")


def _shape(shape) -> str:
    return "×".join(str(n) for n in shape) if shape else "scalar"


def _scale(*arrays) -> float:
    return max(float(np.max(np.abs(a), initial=0.0)) for a in arrays)


def _maps(items: List[Tuple[np.ndarray, str]]) -> str:
    """Heatmaps of several arrays on one shared scale, with its colour bar."""
    scale = _scale(*(a for a, _ in items))
    figures = "".join(heatmap(a, scale, caption) for a, caption in items)
    return f'<div class="maps">{figures}{colour_bar(scale)}</div>'


def _summary_table(explained: Explained) -> str:
    rows = "".join(
        f"<tr><td>{escape(r.path)}</td><td>{'&nbsp;' * 4 * r.depth}{escape(r.layer)}</td>"
        f"<td>{_shape(r.input_shape)}</td><td>{_shape(r.output_shape)}</td>"
        f'<td class="n">{"" if r.type == RESIDUAL else f"{r.params:,}"}</td></tr>'
        for r in explained.model.summary)
    return ('<table class="rows"><tr><th>#</th><th>layer</th><th>input</th><th>output</th>'
            f"<th>parameters</th></tr>{rows}</table>")


def _label_text(explained: Explained) -> str:
    return str(int(explained.hand["label"]))


def _forward(explained: Explained) -> str:
    hand = explained.hand
    parts = [f"<p>The example enters as {_shape(explained.model.input_shape)}; each layer's "
             f"output is the next one's input. Each row has its own colour scale.</p>",
             _maps([(hand["0/input"], f"test example {explained.index}, label "
                                      f"{_label_text(explained)}")])]
    for i, row in enumerate(explained.model.top_rows):
        parts.append(f"<h4>Layer {i} · {escape(row.layer)}: {_shape(row.input_shape)} → "
                     f"{_shape(row.output_shape)}</h4>")
        parts.append(_maps([(hand[f"{i}/output"], f"output of layer {i}")]))
    return "".join(parts)


def _loss_terms(explained: Explained, j) -> Tuple[Tuple[Term, ...], str]:
    """The terms of the built-in losses' δ at output entry j, and what they say; ((), "")
    for another loss."""
    hand, model = explained.hand, explained.model
    last = len(model.layers) - 1
    a = Term(f"a{spot(j)}", float(hand[f"{last}/output"][j]), "", 1.0,
             source(f"{last}/output", j))
    if model.loss_name == "softmax_cross_entropy":
        z = np.asarray(hand[f"{last}/output"], np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        one_hot = float(j[-1] == int(hand["label"]))
        return ((Term(f"softmax(z){spot(j)}", float(p[j]), "", 1.0),
                 Term(f"−onehot(label){spot(j)}", -one_hot, "", 1.0)),
                "Softmax cross-entropy takes the logits z: δ = softmax(z) − onehot(label).")
    if model.loss_name != "quadratic":
        return (), ""
    if model.target == "input":
        x = hand["0/input"]
        at = np.unravel_index(np.ravel_multi_index(j, hand[f"{last}/output"].shape), x.shape)
        return ((a, Term("−1", -1.0, f"x{spot(at)}", float(x[at]), "", source("0/input", at))),
                "The quadratic loss ½ Σ (a − x)² compares the output a with the input x: "
                "δ = a − x.")
    return ((a, Term(f"−y{spot(j)}", -float(j[-1] == int(hand["label"])), "", 1.0)),
            "The quadratic loss ½ Σ (a − y)² with y the label's one-hot: δ = a − y.")


def _loss_step(explained: Explained) -> Step:
    """The loss and the label, and the loss's δ spelled out at its largest entry."""
    hand = explained.hand
    delta_key = f"{len(explained.model.layers) - 1}/delta_output"
    j = largest(hand[delta_key])
    summary = Grid("the loss and the label", np.array(
        [[float(hand["loss"]), float(hand["label"])]]), (("L", "label"),),
        ((source("loss"), source("label")),))
    terms, text = _loss_terms(explained, j)
    if not terms:
        return Step("The loss hands down the first δ", "Its rule above gives the δ below.",
                    (summary,))
    return Step("The loss hands down the first δ", f"{text} Averaged over the batch, which is "
                "this one example.", (summary,),
                (Equation(f"δ{spot(j)}", terms, float(hand[delta_key][j]),
                          source(delta_key, j)),))


def _loss(explained: Explained) -> str:
    model, hand = explained.model, explained.hand
    last = len(model.layers) - 1
    rule = registry.get(model.loss_name, "loss").hand
    prediction = ""
    if model.target == "labels":
        prediction = (f" The network's largest output is class "
                      f"{int(np.argmax(hand[f'{last}/output']))}; the label is "
                      f"{_label_text(explained)}.")
    step = _loss_step(explained)
    return (f"<p>Loss <b>{escape(model.loss_name)}</b>: L = "
            f"{format_number(float(hand['loss']))}.{prediction} Its backward:</p>"
            f"{_rule_html(rule)}{render_step(step, 4)}"
            + _maps([(hand[f"{last}/delta_output"], f"δ the loss hands to layer {last}")]))


def _sizes(explained: Explained) -> str:
    """How large δ is where it leaves each layer: a bar per layer on a log scale."""
    hand, rows = explained.hand, explained.model.top_rows
    last = len(rows) - 1
    entries = [(f"from the loss to layer {last}", _scale(hand[f"{last}/delta_output"]))]
    entries += [(f"layer {i} ({row.type}) sends down", _scale(hand[f"{i}/delta_input"]))
                for i, row in reversed(list(enumerate(rows)))]
    positive = [v for _, v in entries if v > 0]
    low, high = (np.log10(min(positive)), np.log10(max(positive))) if positive else (0, 0)
    span = max(high - low, 1e-12)
    widths = [0.0 if v <= 0 else 1 + 15 * (np.log10(v) - low) / span for _, v in entries]
    lines = "".join(
        f'<tr><td>{escape(label)}</td><td class="n">{value:.3g}</td><td>'
        f'<span class="size" style="width: {width:.2f}rem"></span></td></tr>'
        for (label, value), width in zip(entries, widths))
    return ("<p>The largest |δ| at each step down, bars on a log scale (from "
            f"{10 ** low:.2g} to {10 ** high:.2g}): where they shrink, the δ fades.</p>"
            f'<table class="rows"><tr><th>δ</th><th>max |δ|</th><th></th></tr>{lines}'
            "</table>")


def _errors(explained: Explained, i: int) -> str:
    prefix = f"{i}/"
    keys = [k for k in explained.errors if k.startswith(prefix)]
    order = {"input": 0, "output": 1, "delta_output": 2, "delta_input": 4}
    keys.sort(key=lambda k: (order.get(k[len(prefix):], 3), k))
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{_shape(explained.hand[k].shape)}</td>"
        f'<td class="n">{explained.errors[k]["max_rel_error"]:.1e}</td>'
        f"<td>{'' if explained.errors[k]['scale'] == 'own' else _NETWORK_SCALE}</td></tr>"
        for k in keys)
    return ("<p>Hand rule against autodiff (jax.grad of the plain twins, run on the same "
            "parameters and example), max relative error per array:</p>"
            '<table class="rows"><tr><th>array</th><th>shape</th><th>max rel. error</th>'
            f"<th></th></tr>{rows}</table>")


_NETWORK_SCALE = ("zero but for rounding: relative to the network's largest gradient entry, "
                  "as jaxbp check measures it")


def _layer_view(explained: Explained, i: int, row) -> Layer:
    return Layer(i, row.type, explained.cfg.model.layers[i].hyperparameters, explained.hand,
                 explained.slopes, explained.model_state[i], explained.model.loss_name,
                 i == len(explained.model.layers) - 1)


def _backward_layer(explained: Explained, i: int, row) -> str:
    hand = explained.hand
    inner = [r for r in explained.model.summary if r.path.startswith(f"{i}.")]
    what = f"<p>{escape(row.layer)}"
    if row.param_shapes:
        what += "; parameters " + ", ".join(f"{escape(n)} {_shape(s)}"
                                             for n, s in row.param_shapes.items())
    what += ".</p>"
    if inner:
        what += "<p>Inside the block: " + "; ".join(
            f"{escape(r.path[len(str(i)) + 1:])} {escape(r.layer)} → {_shape(r.output_shape)}"
            for r in inner) + ".</p>"
    maps = [(hand[f"{i}/delta_output"], f"δ arriving at layer {i} (∂L/∂output)")]
    maps += [(hand[f"{i}/{name}/delta_input"], f"δ sent down through the {name} path")
             for name, _ in explained.model.layers[i].parts]
    maps.append((hand[f"{i}/delta_input"], f"δ layer {i} sends down (∂L/∂input)"))
    steps = "".join(render_step(s, 4) for s in worked_steps(_layer_view(explained, i, row)))
    return (f'<section class="layer"><h3>Layer {i} · {escape(row.type)}: δ '
            f"{_shape(row.output_shape)} → {_shape(row.input_shape)}</h3>{what}"
            f"<p>Its backward, as its rule writes it:</p>{_rule_html(_rule(row.type))}"
            f"{_maps(maps)}{steps}{_errors(explained, i)}</section>")


def _legend(explained: Explained) -> str:
    worst_key = max(explained.errors, key=lambda k: explained.errors[k]["max_rel_error"])
    precision = explained.cfg.train.precision
    lines = [
        "Heatmaps: white is zero, red positive, blue negative, full colour at the largest "
        "magnitude of the row. In the backward part the δ arriving at a layer and the δ it "
        "sends down share one scale, so a δ that shrinks through the layer looks fainter.",
        "Training mode, as in a training step (batch norm with this example's own statistics, "
        "dropout masks drawn): backpropagation only runs in training, and only training has "
        "a hand-derived rule for every layer. The batch is this one example.",
        "Worked steps: each picks the entry where the layer's δ is largest and spells the "
        "rule out there with the recorded numbers; table cells are coloured like the maps, "
        "each table on its own scale.",
        f"Every array here was computed by the hand rules and again by jax.grad of the plain "
        f"twins: the worst max relative error is "
        f"{explained.errors[worst_key]['max_rel_error']:.1e} "
        f"({worst_key}); jaxbp check's tolerance in {precision} is "
        f"{TOLERANCE[precision]:g}.",
        f"The arrays are in {NPZ_FILE} beside this page, keys \"{{i}}/input\", "
        f"\"{{i}}/output\", \"{{i}}/delta_output\", \"{{i}}/delta_input\", \"{{i}}/w\", "
        f"\"{{i}}/grad_w\", ...",
    ]
    return '<div class="legend">' + "".join(f"<p>{escape(line)}</p>" for line in lines) + "</div>"


def render_network_page(explained: Explained, name: str) -> str:
    """The whole page for the recording of config `name`."""
    cfg, rows = explained.cfg, explained.model.top_rows
    title = f"Backpropagation through {name}"
    subtitle = (f"Test example {explained.index} of {cfg.data.name} ({explained.examples} in "
                f"the split), label {_label_text(explained)}; parameters {explained.origin}; "
                f"{cfg.train.precision}.")
    backward = "".join(_backward_layer(explained, i, row)
                       for i, row in reversed(list(enumerate(rows))))
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}\n{NETWORK_STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f'<p class="source">{escape(subtitle)}</p>{_legend(explained)}'
            f"<section><h2>The network</h2>{_summary_table(explained)}</section>"
            f"<section><h2>1. Forward: the example goes up</h2>{_forward(explained)}</section>"
            f"<section><h2>2. The loss</h2>{_loss(explained)}</section>"
            "<section><h2>3. Backward: the delta comes down</h2><p>Read from here down to "
            "follow δ from the loss back to the input: each layer gets the δ the layer above "
            "sent down (its ∂L/∂output) and sends ∂L/∂input to the layer below.</p>"
            f"{_sizes(explained)}{backward}</section></body></html>\n")


def config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
