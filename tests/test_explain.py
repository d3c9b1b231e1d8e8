"""`jaxbp explain`: the worked examples' numbers are the hand rule's and the sources' identities
hold term by term; a config's network recorded layer by layer is one chain that equals the
twins' and the whole network's gradient, its page's worked numbers are the recorded arrays';
the CLI's exits; every page in a real headless browser."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from idx_fixtures import write_idx_dataset
from jaxbp import layers, registry
from jaxbp.app import data
from jaxbp.app.checkpoint import CheckpointWriter
from jaxbp.app.cli import main
from jaxbp.app.config import load_config
from jaxbp.app.explain import PAGE_FILE, write_example_page
from jaxbp.app.explain.examples import (EXAMPLES, Grid, seed003, seed004, spread_and_pad,
                                        term_sum)
from jaxbp.app.explain.html import cell_colour, format_number, render_grid
from jaxbp.app.experiment import build, run_once
from jaxbp.app.explain.network import NPZ_FILE, explain
from jaxbp.app.explain.page import backward_equation, render_network_page
from jaxbp.app.steps import step_key
from jaxbp.registry import HAND

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PageReader(HTMLParser):
    """Reads a page back: each table cell's symbol, data value, source and visible number,
    each equation's left-hand side, value, source, terms and text (by left-hand side, and in
    order), each image and each heading."""

    def __init__(self):
        super().__init__()
        self.cells, self.equations, self.in_order, self._open = [], {}, [], None
        self.images, self.headings = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-symbol" in attrs:
            self._open = {"symbol": attrs["data-symbol"], "value": float(attrs["data-value"]),
                          "source": attrs.get("data-source", ""), "text": ""}
            self.cells.append(self._open)
        elif tag == "div" and attrs.get("class") == "eq":
            self._open = {"lhs": attrs["data-lhs"], "value": float(attrs["data-value"]),
                          "source": attrs.get("data-source", ""),
                          "terms": json.loads(attrs.get("data-terms", "[]")), "text": ""}
            self.equations[attrs["data-lhs"]] = self._open
            self.in_order.append(self._open)
        elif tag == "img":
            self.images.append(attrs)
        elif tag in ("h2", "h3", "h4"):
            self._open = {"text": ""}
            self.headings.append(self._open)

    def handle_endtag(self, tag):
        if tag in ("td", "div", "h2", "h3", "h4"):
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



# --- a config's own network ----------------------------------------------------------------

# Every layer type with a worked step: 28x28 -> conv 4@3x3 stride 2 pad 1 (its bias before
# batch norm has a gradient of rounding noise) -> 14x14x4 -> batch norm -> winner of 2 maps
# -> 14x14x2 -> tanh -> an identity block -> a strided block with a conv shortcut -> 7x7x4
# -> pool (one row unreached) -> 3x3x4 -> 36 -> dense 16 -> sigmoid -> dense 10 -> softmax,
# the quadratic loss: seed 001's layers with seed 003's stride and the modern blocks.
MIXED = {"layers": [
    {"type": "conv", "features": 4, "kernel": 3, "stride": 2, "padding": 1},
    {"type": "batch_norm"},
    {"type": "channel_max", "group_size": 2},
    {"type": "tanh"},
    {"type": "residual", "layers": [
        {"type": "conv", "features": 2, "kernel": 3, "padding": "SAME"}, {"type": "relu"}]},
    {"type": "residual", "layers": [
        {"type": "conv", "features": 4, "kernel": 3, "stride": 2, "padding": "SAME"},
        {"type": "batch_norm"}],
     "shortcut": [{"type": "conv", "features": 4, "kernel": 1, "stride": 2}]},
    {"type": "max_pool", "window": 2},
    {"type": "flatten"},
    {"type": "dense", "features": 16},
    {"type": "sigmoid"},
    {"type": "dense", "features": 10},
    {"type": "softmax"},
]}
# The ResNet's shape in small, for the CLI (float32, softmax cross-entropy).
MODERN = {"layers": [
    {"type": "conv", "features": 4, "kernel": 3, "padding": "SAME", "use_bias": False},
    {"type": "batch_norm"},
    {"type": "relu"},
    {"type": "residual", "layers": [
        {"type": "conv", "features": 4, "kernel": 3, "padding": "SAME", "use_bias": False},
        {"type": "batch_norm"}]},
    {"type": "relu"},
    {"type": "global_avg_pool"},
    {"type": "dense", "features": 10},
]}
NETWORKS = {"mixed": (MIXED, "quadratic"), "modern": (MODERN, "softmax_cross_entropy")}
TEST_EXAMPLES = 6
STANDARD = ("input", "output", "delta_output", "delta_input")


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    """name -> path of a tiny config on a 32/6-image idx fixture, prepared."""
    root = tmp_path_factory.mktemp("explain-configs")
    idx = write_idx_dataset(root / "idx", n_train=32, n_test=TEST_EXAMPLES)
    paths = {}
    for name, (model, loss) in NETWORKS.items():
        cfg = {"model": model, "loss": loss,
               "optimizer": {"name": "sgd", "learning_rate": 0.1},
               "data": {"name": "mnist", "batch_size": 8, "dir": str(idx),
                        "data_dir": str(root / "cache")},
               "train": {"epochs": 1, "seed": 3}}
        paths[name] = str(root / f"{name}.yaml")
        with open(paths[name], "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f)
    data.prepare(load_config(paths["mixed"]).data)  # its progress bars out of the way
    return paths


@pytest.fixture(scope="module")
def explained(configs):
    """Test example 2 of the mixed network, recorded in float64."""
    return explain(load_config(configs["mixed"], ["train.precision=float64"]), index=2)


@pytest.fixture(scope="module")
def cli_run(configs, tmp_path_factory) -> str:
    """`jaxbp explain modern.yaml --index 5` (float32) run in a fresh folder; that folder."""
    root = tmp_path_factory.mktemp("explain-cli")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["explain", configs["modern"], "--index", "5"]) == 0
    finally:
        os.chdir(cwd)
    return str(root)


def test_the_chain_connects(explained):
    hand, n = explained.hand, len(MIXED["layers"])
    assert {int(k.split("/")[0]) for k in hand if k[0].isdigit()} == set(range(n))
    for i in range(n - 1):
        np.testing.assert_array_equal(hand[f"{i}/output"], hand[f"{i + 1}/input"])
        np.testing.assert_array_equal(hand[f"{i + 1}/delta_input"], hand[f"{i}/delta_output"])
    for i in (4, 5):  # the residual blocks: the fork adds the deltas of both paths
        np.testing.assert_allclose(
            hand[f"{i}/layers/delta_input"] + hand[f"{i}/shortcut/delta_input"],
            hand[f"{i}/delta_input"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(hand[f"{i}/layers/output"] + hand[f"{i}/shortcut/output"],
                                   hand[f"{i}/output"], rtol=1e-12)
    np.testing.assert_array_equal(hand["4/shortcut/delta_input"], hand["4/delta_output"])


def test_every_array_equals_the_reference(explained):
    """In float64 to 1e-10 of the array's largest entry; a gradient that is zero but for
    rounding (the conv bias before batch norm) to 1e-10 of the network's largest gradient,
    as jaxbp check measures it, and so does the page."""
    hand, reference = explained.hand, explained.reference
    assert hand.keys() == reference.keys()
    largest_gradient = max(np.max(np.abs(reference[k])) for k in reference if "/grad_" in k)
    for key in hand:
        scale = np.max(np.abs(reference[key]), initial=0.0)
        if "/grad_" in key and scale < 1e-10 * largest_gradient:
            scale = largest_gradient
        np.testing.assert_allclose(hand[key], reference[key], rtol=0, atol=1e-10 * scale,
                                   err_msg=key)
    assert explained.errors["0/grad_b"]["scale"] == "network"
    assert all(row["ok"] for row in explained.errors.values())
    assert max(row["max_rel_error"] for row in explained.errors.values()) <= 1e-10


def test_the_layers_one_at_a_time_are_the_whole_networks_gradient(explained):
    """The recording's gradients and loss are those of the whole network's jax.grad through
    the hand rules (training mode, the first step's key), as a train step computes them."""
    model, hand = explained.model, explained.hand
    x = jnp.asarray(hand["0/input"])[None]
    labels = jnp.asarray([int(hand["label"])], jnp.int32)
    loss, grads = run_once(jax.value_and_grad(lambda p: model.loss(
        p, x, labels, HAND, train=True, rng=step_key(explained.cfg.train.seed, 0))[0]),
        explained.params)
    np.testing.assert_allclose(hand["loss"], loss, rtol=1e-12)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == 16
    for path, grad in flat:
        i, *rest = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
        np.testing.assert_allclose(hand[f"{i}/grad_{'/'.join(rest)}"], grad, rtol=1e-10,
                                   atol=1e-14)


def entry(arrays, where: str) -> float:
    """The recorded number a page's `data-source` ("key[i,j]") names."""
    key, index = where[:-1].split("[")
    return float(arrays[key][tuple(int(i) for i in index.split(",")) if index else ()])


WORKED = ["The loss hands down the first δ", "Input delta: δ correlated with the rotated kernel",
          "Kernel gradient: input cells times δ", "Batch norm: three terms", "Which map won",
          "δ times the slope", "The fork adds two deltas", "Where each δ went: the winner map",
          "δ = Wᵀδ ⊙ f′(z), with the sizes", "Softmax: the full Jacobian against the diagonal"]


@pytest.fixture(scope="module")
def mixed_page(explained) -> PageReader:
    return read_page(render_network_page(explained, "mixed"))


def worked_sources(page: PageReader, arrays, tolerance: float) -> set:
    """Checks every number of the page that names a source against that recorded entry, and
    every equation's terms, multiplied out and added up, against its value (to `tolerance`
    of its largest product); returns the sources seen."""
    sourced = set()
    for cell in page.cells:
        if cell["source"]:
            assert cell["value"] == entry(arrays, cell["source"]), cell
            assert cell["text"].endswith(format_number(cell["value"])), cell
            sourced.add(cell["source"])
    for equation in page.in_order:
        if equation["source"]:
            assert equation["value"] == entry(arrays, equation["source"]), equation
            sourced.add(equation["source"])
        for left, left_value, right, right_value in equation["terms"]:
            for where, value in ((left, left_value), (right, right_value)):
                if where:
                    assert value == entry(arrays, where), (equation["lhs"], where)
                    sourced.add(where)
        if equation["terms"]:
            products = [a * b for _, a, _, b in equation["terms"]]
            size = max([abs(p) for p in products] + [abs(equation["value"])])
            assert sum(products) == pytest.approx(equation["value"], abs=tolerance * size), \
                equation
    return sourced


def test_the_pages_worked_numbers_are_the_arrays_numbers(explained, mixed_page):
    headings = [h["text"] for h in mixed_page.headings]
    assert all(heading in headings for heading in WORKED), headings
    sourced = worked_sources(mixed_page, explained.hand, 1e-9)
    # Every layer's worked numbers, and the loss's, come from the recording.
    layers_sourced = {where.split("[")[0].split("/")[0] for where in sourced}
    assert layers_sourced >= {"loss", "0", "1", "2", "3", "4", "5", "6", "8", "9", "10", "11"}


def test_the_worked_steps_say_what_the_sources_say(mixed_page):
    equations = mixed_page.in_order
    kernel = next(e for e in equations if e["source"].startswith("0/grad_w["))
    # seed 004's dE/dW1 = δG1·V1 + ...: δ of an output times the input cell the weight met.
    assert all(left.startswith("0/delta_output[") and right.startswith("0/input[")
               for left, _, right, _ in kernel["terms"] if left and right)
    spread = next(e for e in equations if e["lhs"].startswith("δx[")
                  and "the part from δ channel" in e["lhs"] and e["terms"][0][0] in ("", )
                  or e["lhs"].startswith("δx[") and "part from δ channel" in e["lhs"])
    assert len(spread["terms"]) == 9  # the 3x3 rotated kernel over the spread δ
    # stride 2: the spread δ has zeros between its entries, terms with no source
    assert any(left == "" for left, _, _, _ in spread["terms"])
    fork = next(e for e in equations if e["source"].startswith("5/delta_input["))
    assert [t[0].split("[")[0] for t in fork["terms"]] == ["5/layers/delta_input",
                                                           "5/shortcut/delta_input"]
    softmax = [e for e in equations if e["lhs"].startswith("δz")]
    full, diagonal = softmax[0]["value"], softmax[1]["value"]
    assert softmax[0]["source"].startswith("11/delta_input[") and full != diagonal


def test_cli_writes_deltas_and_page_for_a_config(cli_run, capsys):
    out = os.path.join(cli_run, "runs", "explain-modern")
    arrays = np.load(os.path.join(out, NPZ_FILE))
    expected = {"label", "loss", "3/layers/output", "3/layers/delta_input",
                "3/shortcut/output", "3/shortcut/delta_input"}
    for i, item in enumerate(MODERN["layers"]):
        expected |= {f"{i}/{k}" for k in STANDARD}
    for i, names in ((0, ["w"]), (1, ["scale", "offset"]), (3, ["layers/0/w", "layers/1/scale",
                                                               "layers/1/offset"]),
                     (6, ["w", "b"])):
        expected |= {f"{i}/{n}" for n in names} | {f"{i}/grad_{n}" for n in names}
    assert set(arrays.keys()) == expected
    assert arrays["0/input"].dtype == np.float32 and arrays["0/input"].shape == (28, 28, 1)
    assert arrays["6/output"].shape == (10,) and arrays["loss"].shape == ()
    text = open(os.path.join(out, PAGE_FILE), encoding="utf-8").read()
    markup = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]*"', "", text)
    for outside in ("<script", "http", "@import", "url(", "src="):
        assert outside not in markup
    page = read_page(text)
    # float32 arrays, the sums beside them in float64
    assert {w.split("[")[0] for w in worked_sources(page, arrays, 1e-5)} >= {
        "loss", "6/delta_output", "0/grad_w", "1/delta_input", "3/delta_input"}
    assert len(page.images) > 2 * len(MODERN["layers"]) and all(
        img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert "Test example 5 of mnist" in text


def test_a_trained_runs_checkpoint_is_read_and_one_that_does_not_fit_is_refused(
        configs, cli_run, tmp_path, capsys):
    recorded = np.load(os.path.join(cli_run, "runs", "explain-modern", NPZ_FILE))
    names = {0: ["w"], 1: ["scale", "offset"], 6: ["w", "b"]}
    params = [{n: recorded[f"{i}/{n}"] + 1 for n in names.get(i, [])}
              for i in range(len(MODERN["layers"]))]
    params[3] = {"layers": [{"w": recorded["3/layers/0/w"] + 1},
                            {"scale": recorded["3/layers/1/scale"],
                             "offset": recorded["3/layers/1/offset"]}], "shortcut": []}
    state = build(load_config(configs["modern"])).init_state(jnp.float32)
    run = tmp_path / "run"
    with CheckpointWriter(str(run)) as writer:
        writer.save(1, params, params, {"epoch": 1}, state)
    out = tmp_path / "out"
    assert main(["explain", configs["modern"], "--checkpoint", str(run / "checkpoints"),
                 "--out", str(out)]) == 0
    arrays = np.load(out / NPZ_FILE)
    np.testing.assert_array_equal(arrays["0/w"], params[0]["w"])
    np.testing.assert_array_equal(arrays["3/layers/0/w"], params[3]["layers"][0]["w"])
    assert "the checkpoint of epoch 1" in (out / PAGE_FILE).read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["explain", configs["mixed"], "--checkpoint", str(run), "--out",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxbp: error: ") and "does not fit" in err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("argv, message", [
    (["--index", str(TEST_EXAMPLES)], f"0 to {TEST_EXAMPLES - 1}"),
    (["--index", "-1"], "out of range"),
    (["--example", "seed004"], "not both"),
    (["--checkpoint", "{tmp}/nowhere"], "no checkpoint found"),
    (["--out", "{tmp}/file/out"], "file"),
])
def test_bad_input_is_one_line_and_exit_2(configs, argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    assert main(["explain", configs["modern"], *argv, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxbp: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_explain_needs_a_config_or_an_example_and_example_takes_no_config_options(capsys):
    for argv, message in ((["explain"], "needs a CONFIG"),
                          (["explain", "--example", "seed004", "--index", "1"],
                           "--index goes with CONFIG")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("jaxbp: error: ") and message in err


def test_the_backward_equation_is_the_rules_own_docstring():
    assert backward_equation(layers.conv)[0].startswith("Backward: dx = full correlation")
    assert backward_equation(layers.conv_transpose)[0].startswith("Backward (DERIVATIONS.md")
    # A rule whose function has no docstring: the paragraph of its module's docstring.
    load_config(os.path.join(REPO, "configs", "my_softplus.yaml"))  # imports my_rules
    text, where = backward_equation(registry.get("my_softplus").hand)
    assert "dx = delta * sigmoid(x)" in text and where == "the module my_rules"


BROWSER = shutil.which("chromium")
# Run in a copy of the page only (the page itself has no script): once everything has
# loaded, it writes how many images decoded into the body, for --dump-dom to print.
IMAGE_CHECK = ("<script>window.addEventListener('load', () => { const all = [...document.images];"
               " document.body.dataset.images = all.filter(i => i.complete && i.naturalWidth > 0)"
               ".length + '/' + all.length; });</script>")


def browse(page: str, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    run = subprocess.run([BROWSER, "--headless", "--disable-gpu", "--no-sandbox",
                          "--window-size=1200,2000", f"--user-data-dir={tmp_path / 'profile'}",
                          *flags, "file://" + os.path.abspath(page)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.mark.skipif(BROWSER is None, reason="no headless browser: `chromium` is not on PATH "
                                            "(apt-get install -y chromium)")
@pytest.mark.parametrize("name", [*sorted(EXAMPLES), "network"])
def test_page_renders_in_a_headless_browser_without_console_errors(name, cli_run, tmp_path):
    if name == "network":
        page = os.path.join(cli_run, "runs", "explain-modern", PAGE_FILE)
    else:
        page = write_example_page(name, str(tmp_path))
    shot = tmp_path / "explain.png"
    run = browse(page, tmp_path, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}")
    # Console messages from the page come out as CONSOLE lines; a clean page has none.
    assert "CONSOLE" not in run.stderr and "Uncaught" not in run.stderr, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    rendered = read_page(browse(page, tmp_path, "--dump-dom").stdout)
    source = read_page(open(page, encoding="utf-8").read())
    assert len(rendered.cells) == len(source.cells) > 20
    assert [e["lhs"] for e in rendered.in_order] == [e["lhs"] for e in source.in_order]
    checked = tmp_path / "checked.html"
    checked.write_text(open(page, encoding="utf-8").read().replace(
        "</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    loaded = re.search(r'data-images="(\d+)/(\d+)"', browse(checked, tmp_path,
                                                           "--dump-dom").stdout)
    assert loaded and loaded[1] == loaded[2] and int(loaded[2]) == len(source.images)
