"""experiments/bench.py: its tuned autodiff baseline is the reference, and a tiny run reports."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import reference

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                     "bench.py")
_spec = importlib.util.spec_from_file_location("jaxbp_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("shape, window, stride, padding", [
    ((2, 28, 28, 3), 2, None, "VALID"),          # tiles: the reshape path
    ((2, 7, 8, 2), 3, None, "VALID"),            # tiles a cropped extent
    ((2, 12, 4), 4, None, "VALID"),              # 1-D
    ((1, 4, 6, 4, 2), (2, 3, 2), None, "VALID"), # 3-D
    ((2, 9, 9, 2), 3, 2, "VALID"),               # overlapping: falls back to reduce_window
    ((2, 9, 9, 2), 2, None, "SAME"),             # padded: falls back
])
def test_reshape_max_pool_is_the_reference(shape, window, stride, padding):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape))
    want = reference.max_pool(x, window, stride=stride, padding=padding)
    got = bench.reshape_max_pool(x, window, stride=stride, padding=padding)
    np.testing.assert_array_equal(got, want)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape))
    grads = [jax.grad(lambda v, f=f: jnp.sum(weights * f(v, window, stride=stride,
                                                         padding=padding)))(x)
             for f in (bench.reshape_max_pool, reference.max_pool)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=1e-12)


def test_tiny_run_writes_ratios(tmp_path):
    assert bench.main(["--models", "seed002", "--batches", "8", "--rounds", "1",
                       "--warmup", "1", "--no-torch", "--no-defaults",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    (case,) = report["cases"]
    assert set(case["candidates"]) == {"hand", "autodiff", "tuned", "matmul"}
    derived = case["derived"]
    for key in ("hand_over_autodiff", "hand_over_tuned", "hand_gflops"):
        assert np.isfinite(derived[key]) and derived[key] > 0
    low, high = derived["hand_over_autodiff_rounds"]
    assert low == high == pytest.approx(
        case["candidates"]["hand"]["round_medians_ms"][0]
        / case["candidates"]["autodiff"]["round_medians_ms"][0])
    assert derived["hand_over_torch_rounds"] is None
    assert case["candidates"]["hand"]["residual_bytes"] > 0
    assert case["library"]["median_ms"] > 0 and derived["library_over_hand"] > 0
    assert "library_spec" not in case and "library_torch" not in case
    assert derived["library_over_torch"] is None
    text = (tmp_path / "bench.md").read_text()
    assert "| seed002 | 8 |" in text and "No PyTorch ran beside it" in text


def test_library_ratio_is_taken_beside_pytorch_in_its_own_process(tmp_path):
    """library/PyTorch divides by the PyTorch step timed in the library's child process, in
    the same interleaved rounds, not by the main process's."""
    pytest.importorskip("torch")
    assert bench.main(["--models", "seed002", "--batches", "8", "--rounds", "2",
                       "--warmup", "1", "--no-defaults", "--out", str(tmp_path)]) == 0
    (case,) = json.loads((tmp_path / "bench.json").read_text())["cases"]
    library, beside = case["library"], case["library_torch"]
    assert len(beside["round_medians_ms"]) == len(library["round_medians_ms"]) == 2
    derived = case["derived"]
    assert derived["library_over_torch"] == pytest.approx(
        library["median_ms"] / beside["median_ms"])
    assert derived["library_over_torch_rounds"] == pytest.approx(
        bench.round_ratio_range(library, beside))
    assert f"seed002 8 {beside['median_ms']:.1f}" in (tmp_path / "bench.md").read_text()


def test_round_ratio_range_pairs_rounds():
    hand = bench.summary([[0.010, 0.012, 0.011], [0.020], [0.009, 0.030]])
    assert hand["round_medians_ms"] == pytest.approx([11.0, 20.0, 19.5])
    assert hand["median_ms"] == pytest.approx(11.5)
    other = {"round_medians_ms": [22.0, 25.0, 39.0]}
    assert bench.round_ratio_range(hand, other) == pytest.approx([0.5, 0.8])
    assert bench.round_ratio_range(hand, None) is None


def test_time_to_accuracy_on_tiny_data(tmp_path):
    """One epoch of the tiny config to a target of 0: each installed system reports."""
    from idx_fixtures import write_idx_dataset
    from test_train import write_config
    idx = write_idx_dataset(tmp_path / "idx", n_train=256, n_test=128)
    config = write_config(tmp_path / "tiny.yaml", str(idx), str(tmp_path / "cache"))
    assert bench.main(["--time-to-accuracy", config, "--target", "0.0", "--no-torch",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    jaxbp = report["results"]["jaxbp"]
    assert jaxbp["reached"] and jaxbp["epochs"] == 1 and jaxbp["time_to_target_s"] > 0
    assert 0 <= jaxbp["final_accuracy"] <= 1 and "torch" not in report["results"]
    assert "| jaxbp |" in (tmp_path / "time_to_accuracy.md").read_text()


def _time_to_accuracy():
    spec = importlib.util.spec_from_file_location(
        "jaxbp_time_to_accuracy", os.path.join(os.path.dirname(_PATH), "time_to_accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seconds_per_later_epoch_leave_the_first_out():
    """The first epoch also compiles: the per-epoch figure is the mean of the later ones."""
    module = _time_to_accuracy()
    history = [{"elapsed_s": 20.0}, {"elapsed_s": 34.0}, {"elapsed_s": 50.0}]
    assert module.later_epoch_s(history) == pytest.approx(15.0)
    assert module.later_epoch_s(history[:1]) is None
    rows = module.markdown({"jaxbp": {"time_to_target_s": 50.0, "epochs": 3,
                                      "final_accuracy": 0.92, "history": history}}, 0.91)
    assert rows[-1] == "| jaxbp | 50.0 | 3 | 92.00% | - | 15.0 |"


def test_pytorch_starts_from_jaxbps_initial_weights():
    """Time to accuracy copies jaxbp's first draw into PyTorch's layouts (conv OIHW, dense
    transposed, the dense after flatten reading (C, H, W)): the same logits at step 0."""
    import types
    torch = pytest.importorskip("torch")
    module = _time_to_accuracy()
    cfg, model, images, _ = bench.setup_jax_case("lenet5", 2)
    exp = types.SimpleNamespace(cfg=cfg, model=model)
    params = [{k: jnp.asarray(v) for k, v in w.items()} if w else {}
              for w in module.initial_weights(exp)]
    want = model.apply(params, images)
    net, _ = module.torch_from_initial_weights(torch, bench.torch_net, exp)
    with torch.no_grad():
        got = net(torch.from_numpy(np.moveaxis(np.asarray(images), -1, 1).copy())).numpy()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_torch_twins_of_a_strided_same_conv_and_a_residual_block():
    """Where PyTorch has no uneven padding, the conv twin pads explicitly; same numbers."""
    torch = pytest.importorskip("torch")
    from jaxbp import torch_twins
    conv = torch_twins.conv(torch, (9, 8, 3), features=4, kernel=3, stride=2, padding="SAME",
                            dilation=1, groups=1, use_bias=False)
    x = np.random.default_rng(0).standard_normal((2, 9, 8, 3)).astype(np.float32)
    w = conv[1].weight.detach().numpy().transpose(2, 3, 1, 0)
    want = reference.conv(jnp.asarray(x), jnp.asarray(w), None, stride=2, padding="SAME")
    block = torch_twins.residual(torch, conv, torch.nn.Sequential(conv))
    got = block(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), 2 * np.asarray(want), rtol=1e-5,
                               atol=1e-5)
