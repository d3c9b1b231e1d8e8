"""The `jaxbp` command (also `python -m jaxbp`).

    jaxbp train CONFIG [--set KEY=VALUE]... [--out DIR] [--resume]
                [--coordinator HOST:PORT --num-processes P --process-id I
                 [--coordinator-timeout SECONDS]]
    jaxbp eval CONFIG --checkpoint DIR [--set KEY=VALUE]...
    jaxbp check CONFIG [--set KEY=VALUE]... [--out DIR]
    jaxbp data prepare NAME [--set data.KEY=VALUE]...
    jaxbp explain CONFIG [--set KEY=VALUE]... [--checkpoint RUN_DIR] [--index N] [--out DIR]
    jaxbp explain --example NAME [--out DIR]

DIR defaults to runs/<config file name without extension> (runs/explain-<config name> or
runs/explain-NAME for explain).

Exit codes: 0 success; 1 `check` found a gradient that disagrees with jax.grad;
2 unusable input (bad option, config, data, model shapes, or a run folder that
holds another run), reported as one line "jaxbp: error: ..." on stderr, with
nothing in DIR touched; 3 training diverged (NaN or infinite loss), the last good
checkpoint kept; 130 interrupted by Ctrl-C.

Importing jaxbp has applied its CPU defaults before any command runs (`jaxbp.runtime`: an XLA
flag and malloc settings); JAXBP_TUNING=0 in the environment leaves JAX's defaults instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from jaxbp.app import data, distributed
from jaxbp.app.check import run_check
from jaxbp.app.checkpoint import CHECKPOINT_DIR
from jaxbp.app.config import DATA, ConfigError, apply_override, load_config
from jaxbp.app.data import DataError
from jaxbp.app.explain import UnknownExample, write_example_page, write_network_page
from jaxbp.app.explain.examples import EXAMPLES
from jaxbp.schema import check_mapping
from jaxbp.app.train import NonFiniteLoss, RunError, evaluate_checkpoint, train

EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130


def default_out(config_path: str) -> str:
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML experiment config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. optimizer.learning_rate=0.05 "
                             "(repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxbp", description="Train and check CNNs whose backward passes are derived by hand.",
        epilog="Exit codes: 0 ok, 1 gradient check failed, 2 bad input, 3 training diverged.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a config's network")
    _add_config(train)
    train.add_argument("--out", metavar="DIR", help="run folder (default: runs/<config stem>)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in DIR")
    several = train.add_argument_group(
        "several processes", "one run over P processes (hosts), each started with the same "
        "CONFIG, options and DIR (a folder all of them see), and its own --process-id")
    several.add_argument("--coordinator", metavar="HOST:PORT",
                         help="address of process 0, which serves the coordinator on PORT")
    several.add_argument("--num-processes", type=int, metavar="P", help="how many processes")
    several.add_argument("--process-id", type=int, metavar="I", help="this one, 0..P-1")
    several.add_argument("--coordinator-timeout", type=int, metavar="SECONDS",
                         default=distributed.DEFAULT_TIMEOUT_S,
                         help="how long to wait for the coordinator and the other processes "
                              "(default %(default)s)")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="test accuracy of a run's newest checkpoint")
    _add_config(evaluate)
    evaluate.add_argument("--checkpoint", metavar="DIR", required=True,
                          help="run folder (or its checkpoints/ folder)")
    evaluate.set_defaults(handler=cmd_eval)

    check = commands.add_parser(
        "check", help="every parameter's hand-derived gradient against jax.grad",
        description="Runs in float64 unless --set train.precision=float32.")
    _add_config(check)
    check.add_argument("--out", metavar="DIR", help="where check.json goes "
                                                    "(default: runs/<config stem>)")
    check.set_defaults(handler=cmd_check)

    data_parser = commands.add_parser("data", help="data set commands")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = data_commands.add_parser("prepare", help="prepare a data set once")
    prepare.add_argument("name", metavar="NAME")
    prepare.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="data.KEY=VALUE", help="e.g. data.dir=/path/to/idx/files")
    prepare.set_defaults(handler=cmd_data_prepare)

    explain = commands.add_parser(
        "explain", help="backpropagation through a config's network, as one offline HTML page",
        description="Takes test example N of CONFIG's data set through its network, the "
                    "parameters drawn from train.seed (or read from the newest intact "
                    "checkpoint of --checkpoint RUN_DIR), in training mode; records every "
                    "layer's input, output, deltas and gradients through the hand rules and "
                    "through jax.grad of the plain twins; writes DIR/deltas.npz and "
                    "DIR/explain.html and prints the page's path. With --example NAME "
                    "instead of CONFIG, renders a source text's small worked example.")
    explain.add_argument("config", metavar="CONFIG", nargs="?", help="YAML experiment config")
    explain.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a config value, e.g. "
                                                   "train.precision=float64 (repeatable)")
    explain.add_argument("--checkpoint", metavar="RUN_DIR",
                         help="a run folder (or its checkpoints/ folder): use its newest "
                              "intact checkpoint instead of freshly drawn parameters")
    explain.add_argument("--index", metavar="N", type=int,
                         help="which test example (default 0)")
    explain.add_argument("--example", metavar="NAME",
                         help=f"a source's worked example instead of CONFIG, one of: "
                              f"{', '.join(sorted(EXAMPLES))}")
    explain.add_argument("--out", metavar="DIR", help="where the page goes (default: "
                                                      "runs/explain-<config name or NAME>)")
    explain.set_defaults(handler=cmd_explain)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    processes = distributed.cluster(args.coordinator, args.num_processes, args.process_id,
                                    args.coordinator_timeout)
    if processes is not None:  # before anything starts JAX's backend
        distributed.start(processes)
    train(cfg, args.out or default_out(args.config), resume=args.resume)
    return 0


def run_folder(path: str) -> str:
    """The run folder of --checkpoint, given as the run folder or its checkpoints/ folder."""
    run_dir = os.path.normpath(path)
    return os.path.dirname(run_dir) if os.path.basename(run_dir) == CHECKPOINT_DIR else run_dir


def _note(line: str) -> None:
    """Notes (skipped checkpoints) go to stderr, so that stdout holds only the result."""
    print(line, file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = evaluate_checkpoint(cfg, run_folder(args.checkpoint), echo=_note)
    print(json.dumps(result))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    # Prepended, so that a --set train.precision=float32 given by the user wins.
    cfg = load_config(args.config, ["train.precision=float64", *args.overrides])
    result = run_check(cfg, args.out or default_out(args.config))
    return 0 if result["ok"] else EXIT_CHECK_FAILED


def data_config(name: str, overrides: Sequence[str]) -> dict:
    """The validated `data` section for data set `name` with `data.*` overrides."""
    raw = {"data": {"name": name}}
    for override in overrides:
        if not override.strip().startswith("data."):
            raise ConfigError(f"--set: `data prepare` only takes data.* keys, got {override!r}")
        apply_override(raw, override)
    return check_mapping("data", raw["data"], DATA)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    print(data.prepare(data_config(args.name, args.overrides)))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    if args.config is None and args.example is None:
        raise ConfigError("explain needs a CONFIG or --example NAME")
    if args.config is not None and args.example is not None:
        raise ConfigError(f"explain takes a CONFIG or --example NAME, not both (got "
                          f"{args.config} and --example {args.example})")
    if args.example is not None:
        config_only = [flag for flag, given in (("--set", args.overrides),
                                                ("--checkpoint", args.checkpoint),
                                                ("--index", args.index is not None)) if given]
        if config_only:
            raise ConfigError(f"{', '.join(config_only)} "
                              f"go{'es' if len(config_only) == 1 else ''} with CONFIG, not "
                              f"with --example")
        print(write_example_page(args.example, args.out or os.path.join(
            "runs", f"explain-{args.example}")))
        return 0
    cfg = load_config(args.config, args.overrides)
    name = os.path.basename(default_out(args.config))
    run_dir = None if args.checkpoint is None else run_folder(args.checkpoint)
    print(write_network_page(cfg, name, args.out or os.path.join("runs", f"explain-{name}"),
                             0 if args.index is None else args.index, run_dir, echo=_note))
    return 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError, RunError, UnknownExample, OSError) as exc:
        print(f"jaxbp: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as exc:
        print(f"jaxbp: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("jaxbp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
