"""Wall time to a test accuracy: jaxbp's CLI step against Flax and PyTorch, same data, same
recipe (`experiments/bench.py --time-to-accuracy`).

Each system trains the config's network (lenet5 by default) with the config's optimizer and
cosine schedule, on the same batches in the same order (`jaxbp.app.data.epoch_batches` of the
config's seed), from the same initial weights (jaxbp's draw for the config's seed, copied into
Flax's and PyTorch's layouts: with 91% reached between the 3rd and 5th epoch, separate draws
decided the epoch count), and is evaluated on the whole test split after every epoch. The
clock starts before the parameters are drawn (so compiling counts, as it does for a user) and
stops after the first evaluation at or above the target. The systems run one after the other
in this process.

  jaxbp  the CLI's compiled train and eval steps (`jaxbp.app.steps`), hand-derived rules.
  flax   the same network as a Flax linen module, `jax.value_and_grad`, optax, `jax.jit`:
         the way JAX users write it (optional: pip install flax).
  torch  PyTorch eager, its modules from the registry's PyTorch twins (optional extra `bench`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np

TARGET = 0.91


def _epochs_to_target(train_epoch: Callable[[int], None], evaluate: Callable[[], float],
                      epochs: int, target: float, start: float) -> dict:
    """Trains epoch by epoch until `evaluate()` reaches `target`: the times and accuracies."""
    history = []
    for epoch in range(1, epochs + 1):
        train_epoch(epoch)
        accuracy = evaluate()
        history.append({"epoch": epoch, "test_accuracy": accuracy,
                        "elapsed_s": time.perf_counter() - start})
        if accuracy >= target:
            break
    reached = history[-1]["test_accuracy"] >= target
    return {"reached": reached, "time_to_target_s": history[-1]["elapsed_s"] if reached else None,
            "epochs": history[-1]["epoch"], "final_accuracy": history[-1]["test_accuracy"],
            "history": history}


def run_jaxbp(exp, target: float) -> dict:
    import jax.numpy as jnp
    from jaxbp.app import parallel, train
    from jaxbp.app.experiment import initial_state, steps_per_epoch
    from jaxbp.app.optim import make_optimizer
    from jaxbp.app.steps import make_eval_step, make_train_steps
    cfg = exp.cfg
    start = time.perf_counter()
    steps = steps_per_epoch(exp)
    optimizer = make_optimizer(cfg.optimizer, steps, cfg.train.epochs)
    mesh = parallel.make_mesh(parallel.mesh_devices(1))  # one device, as the others run
    state = {"s": parallel.replicate(
        initial_state(exp.model, optimizer, cfg.train.seed, jnp.float32), mesh)}
    on_all = parallel.replicated(mesh)
    step = make_train_steps(exp.model, optimizer, jnp.float32, cfg.train.seed, on_all)
    eval_step = make_eval_step(exp.model, jnp.float32, on_all)

    def train_epoch(epoch):
        state["s"] = train.train_epoch(step, state["s"], exp, epoch, steps, mesh)[0]

    def evaluate():
        return train.evaluate(eval_step, state["s"].params, state["s"].model_state, exp.test,
                              cfg.data.batch_size, jnp.float32, mesh)[1]

    return _epochs_to_target(train_epoch, evaluate, cfg.train.epochs, target, start)


def initial_weights(exp) -> List[Optional[dict]]:
    """jaxbp's initial parameters for the config's seed as numpy, one entry per top-level layer
    (None for a layer without parameters), the conv and dense layers' only."""
    import jax.numpy as jnp
    import optax
    from jaxbp.app.experiment import initial_state
    params = initial_state(exp.model, optax.identity(), exp.cfg.train.seed, jnp.float32).params
    if len(params) != len(exp.cfg.model.layers):
        raise NotImplementedError("time to accuracy copies the weights of top-level layers only")
    weights = []
    for item, layer in zip(exp.cfg.model.layers, params):
        if layer and item.type not in ("conv", "dense"):
            raise NotImplementedError(f"time to accuracy copies no {item.type} parameters")
        weights.append({k: np.array(v) for k, v in layer.items()} if layer else None)
    return weights


def torch_layout(weights: List[Optional[dict]], types: List[str],
                 input_shapes: List[tuple]) -> List[Optional[dict]]:
    """`initial_weights` for PyTorch's modules: conv (kh, kw, in, out) -> (out, in, kh, kw),
    dense (in, out) -> (out, in), and a dense right after a flatten takes its inputs in PyTorch's
    (C, H, W) order instead of our (H, W, C)."""
    out = []
    for index, layer in enumerate(weights):
        if layer is None:
            out.append(None)
            continue
        w = layer["w"]
        if w.ndim > 2:
            w = np.transpose(w, (w.ndim - 1, w.ndim - 2, *range(w.ndim - 2)))
        else:
            if index and types[index - 1] == "flatten":
                w = np.moveaxis(w.reshape(*input_shapes[index - 1], -1), -2, 0).reshape(w.shape)
            w = w.T
        out.append({"w": np.ascontiguousarray(w), "b": layer.get("b")})
    return out


def run_flax(exp, target: float) -> dict:
    """LeNet-5 as Flax users write it; only configs whose layers it knows (lenet5's)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn
    from jaxbp.app import data
    from jaxbp.app.experiment import steps_per_epoch
    from jaxbp.app.optim import make_optimizer
    cfg = exp.cfg

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for item in cfg.model.layers:
                if item.type == "conv":
                    x = nn.Conv(item.features, (item.kernel,) * 2, padding=item.padding)(x)
                elif item.type == "dense":
                    x = nn.Dense(item.features)(x)
                elif item.type == "relu":
                    x = nn.relu(x)
                elif item.type == "max_pool":
                    x = nn.max_pool(x, (item.window,) * 2, (item.window,) * 2)
                elif item.type == "flatten":
                    x = x.reshape((x.shape[0], -1))
                else:
                    raise NotImplementedError(f"the Flax twin has no {item.type}")
            return x

    start = time.perf_counter()
    net, steps = Net(), steps_per_epoch(exp)
    optimizer = make_optimizer(cfg.optimizer, steps, cfg.train.epochs)
    drawn = jax.eval_shape(net.init, jax.random.PRNGKey(cfg.train.seed),
                           jnp.zeros((1, *exp.train.images.shape[1:]), jnp.float32))
    counts, params = {"conv": 0, "dense": 0}, {}
    for item, layer in zip(cfg.model.layers, initial_weights(exp)):
        if layer is not None:
            name = f"{'Conv' if item.type == 'conv' else 'Dense'}_{counts[item.type]}"
            counts[item.type] += 1
            params[name] = {"kernel": jnp.asarray(layer["w"]), "bias": jnp.asarray(layer["b"])}
    params = {"params": params}
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(drawn):
        raise NotImplementedError("the Flax twin's parameters do not match the config's")
    state = {"params": params, "opt": optimizer.init(params)}

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y).mean()

    @jax.jit
    def step(p, opt_state, x, y):
        grads = jax.grad(loss_fn)(p, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    @jax.jit
    def correct(p, x, y):
        return jnp.sum(jnp.argmax(net.apply(p, x), -1).astype(y.dtype) == y)

    def train_epoch(epoch):
        for x, y in data.epoch_batches(exp.train, cfg.data.batch_size, cfg.train.seed, epoch):
            state["params"], state["opt"] = step(state["params"], state["opt"], x, y)

    def evaluate():
        total = sum(int(correct(state["params"], x, y)) for x, y in data.epoch_batches(
            exp.test, cfg.data.batch_size, 0, 0, shuffle=False, drop_remainder=False))
        return total / len(exp.test.labels)

    return _epochs_to_target(train_epoch, evaluate, cfg.train.epochs, target, start)


def torch_from_initial_weights(torch, torch_net: Callable, exp):
    """The config's PyTorch twin and loss (`torch_net`), its conv and dense layers holding
    `initial_weights` in PyTorch's layout."""
    cfg = exp.cfg
    net, loss_fn = torch_net(torch, exp.model, cfg.model.layers, cfg.loss, exp.model.num_classes)
    rows = [row for row in exp.model.summary if "." not in row.path]
    weights = torch_layout(initial_weights(exp), [item.type for item in cfg.model.layers],
                           [row.input_shape for row in rows])
    with torch.no_grad():
        for block, layer in zip(net, weights):
            if layer is not None:
                (module,) = [m for m in block.modules() if hasattr(m, "weight")]
                module.weight.copy_(torch.from_numpy(layer["w"]))
                module.bias.copy_(torch.from_numpy(layer["b"]))
    return net, loss_fn


def run_torch(exp, target: float, torch, torch_net: Callable) -> dict:
    from jaxbp.app import data
    cfg = exp.cfg
    start = time.perf_counter()
    net, loss_fn = torch_from_initial_weights(torch, torch_net, exp)
    opt_cfg, steps = cfg.optimizer, data.num_batches(len(exp.train.labels),
                                                      cfg.data.batch_size, True)
    total = steps * cfg.train.epochs
    optimizer = torch.optim.Adam(net.parameters(), lr=opt_cfg.learning_rate,
                                 betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

    def train_epoch(epoch):
        net.train()
        for x, y in data.epoch_batches(exp.train, cfg.data.batch_size, cfg.train.seed, epoch):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(nchw(x)), torch.from_numpy(y).long()).backward()
            optimizer.step()
            schedule.step()

    def evaluate():
        net.eval()
        with torch.no_grad():
            right = sum(int((net(nchw(x)).argmax(1) == torch.from_numpy(y).long()).sum())
                        for x, y in data.epoch_batches(exp.test, cfg.data.batch_size, 0, 0,
                                                       shuffle=False, drop_remainder=False))
        return right / len(exp.test.labels)

    return _epochs_to_target(train_epoch, evaluate, cfg.train.epochs, target, start)


def run(config_path: str, overrides: List[str], target: float, torch, torch_net: Callable,
        notes: List[str]) -> Dict[str, Optional[dict]]:
    """Every available system on the config's data; a missing optional one is a note."""
    from jaxbp.app.config import load_config
    from jaxbp.app.experiment import setup
    exp = setup(load_config(config_path, overrides))
    results: Dict[str, Optional[dict]] = {"jaxbp": run_jaxbp(exp, target)}
    try:
        import flax  # noqa: F401
        results["flax"] = run_flax(exp, target)
    except ImportError:
        notes.append("flax not installed (pip install flax): no Flax column")
    if torch is None:
        notes.append("torch not installed: no PyTorch column")
    elif exp.cfg.optimizer.name != "adam" or exp.cfg.optimizer.schedule.name != "cosine":
        notes.append("the PyTorch recipe here is Adam on a cosine schedule: no PyTorch column")
    else:
        results["torch"] = run_torch(exp, target, torch, torch_net)
    return results


def later_epoch_s(history: List[dict]) -> Optional[float]:
    """Mean seconds per epoch after the first (which also compiles), training and evaluation."""
    if len(history) < 2:
        return None
    return (history[-1]["elapsed_s"] - history[0]["elapsed_s"]) / (len(history) - 1)


def markdown(results: Dict[str, dict], target: float) -> List[str]:
    jaxbp = results["jaxbp"]["time_to_target_s"]
    rows = [f"| system | time to {100 * target:.0f}% (s) | epochs | final accuracy "
            f"| jaxbp / system | s per later epoch |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["time_to_target_s"]
        versus = f"{jaxbp / t:.2f}" if t and jaxbp and name != "jaxbp" else "-"
        per_epoch = later_epoch_s(r["history"])
        rows.append(f"| {name} | {'not reached' if t is None else f'{t:.1f}'} | {r['epochs']} "
                    f"| {100 * r['final_accuracy']:.2f}% | {versus} "
                    f"| {'-' if per_epoch is None else f'{per_epoch:.1f}'} |")
    return rows
