"""``curvscope track``: train a model while curvature snapshots are taken on a schedule.

A :class:`~curvscope.tracking.Tracker` takes them; resumable with ``--resume`` (the loop and its
state are :mod:`curvscope.tracking.training`'s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any

from ..tracking.training import DEFAULT_LR, DEFAULT_MOMENTUM, OPTIMIZERS
from . import jsonout, options
from .errors import CLIError, one_line
from .problem import KEEP_GRAPHS, ProblemDefaults, ProblemSpec, load_problem

#: The default problem: the edge-of-stability setting of Cohen et al. 2021 scaled down.
TRACK_PROBLEM = ProblemDefaults("curvscope.zoo:digits_mlp", "curvscope.zoo:digits_subset", "mse")


@dataclasses.dataclass(frozen=True)
class TrackSettings:
    """What a run is trained and measured with.

    The options given, else (with --resume) the run's own, else these defaults. All are None in the
    parser when not given.
    """

    model: str = TRACK_PROBLEM.model
    data: str = TRACK_PROBLEM.data
    loss: str = TRACK_PROBLEM.loss
    optimizer: str = "sgd"
    lr: float | None = None  # DEFAULT_LR of the optimizer
    momentum: float | None = None  # DEFAULT_MOMENTUM; refused for sgd
    batch_size: int | None = None  # full batch
    seed: int = 0
    schedule: str = "every:25"
    measure: str = "top,stability,trace"
    top_k: int = 1
    trace_probes: int = 60
    density_iters: int = 80
    density_probes: int = 5
    ntk_method: str = "hutchinson"
    ntk_probes: int = 10
    dtype: str | None = None
    params: list[str] | None = None


DEFAULTS = TrackSettings()


class _Formatter(options.FORMATTER):
    """Lists the registered measurements in --measure's help.

    Loads curvscope.tracking only when the help is shown.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and "{measurements}" in text:
            from ..tracking import MEASUREMENTS

            text = text.replace("{measurements}", ",".join(MEASUREMENTS))
        return text


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``track`` to the ``curvscope`` subcommands."""
    common = options.problem_parser(
        TRACK_PROBLEM,
        out_help="run folder (default: results/track/YYYYmmdd-HHMMSS; needed with --resume)",
        seed=None,
    )
    parser = commands.add_parser(
        "track",
        parents=[common],
        formatter_class=_Formatter,
        help="train a model while tracking its curvature",
        allow_abbrev=False,
        description=options.wrap(
            "Train a model with SGD (full batch by default), heavy-ball or Nesterov momentum, or "
            "Adam, and take curvature snapshots on a schedule with curvscope.tracking.Tracker: "
            "top eigenvalues, the sharpness against the optimizer's stability threshold "
            "(2/eta for GD, 2(1+beta)/eta for heavy ball, ...), trace, SLQ density, NTK trace and "
            "the stochastic-edge K. The default problem is the edge-of-stability setting of "
            "Cohen et al. 2021 scaled down: a 64-32-32-10 tanh MLP, MSE on one-hot targets, "
            "1,000 digits, full-batch GD. Prints one line per snapshot and the run folder at "
            "the end; read it with curvscope.tracking.load_run or draw it with 'curvscope plot'."
        ),
        epilog="examples:\n"
        "  curvscope track --steps 1000 --lr 2 --out runs/gd\n"
        "  curvscope track --batch-size 16 --measure top,stability,density\n"
        "  curvscope track --model curvscope.zoo:digits_regressor --data "
        "curvscope.zoo:digits_sign_data --loss mse --batch-size 8 --measure top,stochastic_edge\n"
        "  curvscope track --optimizer momentum --lr 0.3 --momentum 0.9 --schedule log:1:2000:20\n"
        "  curvscope track --out runs/gd --steps 2000 --resume   # continue a run to step 2000\n"
        "  curvscope track --measure top,density --tensorboard runs/tb --wandb my-project\n"
        + options.COMMON_EPILOG,
    )
    group = parser.add_argument_group("training")
    group.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="sgd (plain; GD with full batches), momentum (heavy ball), nesterov or adam "
        f"(default: {DEFAULTS.optimizer})",
    )
    group.add_argument(
        "--lr",
        type=options.positive_float,
        help="learning rate (default: "
        + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
        + ": for sgd the edge-of-stability regime of the default problem)",
    )
    group.add_argument(
        "--momentum",
        type=float,
        help=f"momentum beta of momentum/nesterov, beta1 of adam (default: {DEFAULT_MOMENTUM})",
    )
    group.add_argument(
        "--batch-size",
        type=options.positive_int,
        help="samples per SGD step, drawn without replacement per epoch (default: all, full batch)",
    )
    group.add_argument(
        "--steps", type=options.nonnegative_int, default=1000, help="training steps (default: 1000)"
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last saved training state up to --steps; "
        "settings not given are taken from the run, given ones must match it",
    )
    group = parser.add_argument_group("tracking")
    group.add_argument(
        "--schedule",
        help="snapshot steps: every:K[:START], log:FIRST:LAST:PER_DECADE or steps:S1,S2,... "
        f"(default: {DEFAULTS.schedule})",
    )
    group.add_argument(
        "--measure",
        metavar="LIST",
        help=f"comma-separated measurements: {{measurements}} (default: {DEFAULTS.measure})",
    )
    numbers = [
        ("--top-k", DEFAULTS.top_k, "eigenvalues of top"),
        ("--trace-probes", DEFAULTS.trace_probes, "Hutch++ products of trace"),
        ("--density-iters", DEFAULTS.density_iters, "Lanczos steps per probe of density"),
        ("--density-probes", DEFAULTS.density_probes, "probes of density"),
    ]
    for option, default, what in numbers:
        group.add_argument(option, type=options.positive_int, help=f"{what} (default: {default})")
    group.add_argument(
        "--ntk-method",
        choices=["hutchinson", "exact"],
        help=f"NTK trace estimator of ntk (default: {DEFAULTS.ntk_method})",
    )
    group.add_argument(
        "--ntk-probes",
        type=options.positive_int,
        help=f"Rademacher probes per batch of a hutchinson ntk (default: {DEFAULTS.ntk_probes})",
    )
    group = parser.add_argument_group("logging (docs/logging.md)")
    group.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write each snapshot to TensorBoard event files in DIR (scalars under "
        "curvscope/, densities as histograms and figures); pip install 'curvscope[tensorboard]'",
    )
    group.add_argument(
        "--wandb",
        metavar="PROJECT",
        help="also log each snapshot to a W&B run of PROJECT, offline (in WANDB_DIR or ./wandb) "
        "unless WANDB_MODE says otherwise; pip install 'curvscope[wandb]'",
    )
    parser.set_defaults(run=run)


def stored_settings(out: Path) -> dict[str, Any]:
    """The settings of the run in ``out`` (its run.json), for ``--resume``."""
    try:
        config = json.loads((out / "run.json").read_text()).get("config", {})
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot read {out / 'run.json'}: {one_line(error)}") from error
    extra = config.get("extra", {})
    train = extra.get("train")
    if not isinstance(train, dict):
        raise CLIError(
            f"{out} was not written by curvscope track (no training settings in run.json): "
            "resume it from the loop that wrote it"
        )
    stored = {name: train.get(name) for name in ("model", "data", "loss", "optimizer", "lr")}
    stored.update(
        momentum=train.get("momentum") if train.get("optimizer") != "sgd" else None,
        batch_size=train.get("batch_size"),
        seed=train.get("seed"),
        schedule=config.get("schedule"),
        measure=",".join(config.get("measurements", [])),
        ntk_method=extra.get("ntk_method"),
        ntk_probes=extra.get("ntk_probes"),
    )
    for name in ("top_k", "trace_probes", "density_iters", "density_probes", "dtype", "params"):
        stored[name] = config.get(name)
    return stored


def settings(args: argparse.Namespace) -> TrackSettings:
    """The options given, else the run's own with --resume, else :data:`DEFAULTS`."""
    stored: dict[str, Any] = {}
    if args.resume and args.out is not None and (Path(args.out) / "run.json").is_file():
        stored = stored_settings(Path(args.out))
    names = [field.name for field in dataclasses.fields(TrackSettings)]
    chosen = {name: value for name, value in stored.items() if value is not None}
    chosen.update({name: getattr(args, name) for name in names if getattr(args, name) is not None})
    return dataclasses.replace(DEFAULTS, **chosen)


def measurements(text: str) -> list[str]:
    """The --measure list, checked and put in the order the measurements run in.

    That of :data:`curvscope.tracking.MEASUREMENTS`: stability reuses top's lambda_max.
    """
    from ..tracking import MEASUREMENTS

    known = ",".join(MEASUREMENTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CLIError("--measure is empty: name at least one of " + known)
    unknown = [name for name in names if name not in MEASUREMENTS]
    if unknown:
        raise CLIError(
            f"--measure: unknown measurement {', '.join(map(repr, unknown))}; choose from {known}"
        )
    return [name for name in MEASUREMENTS if name in names]


def run_dir(args: argparse.Namespace) -> Path:
    """--out, checked (a new folder, or a run to --resume), or a new results/track/TIME."""
    if args.out is None:
        if args.resume:
            raise CLIError("--resume needs --out RUN_DIR: the run folder to continue")
        return Path("results") / "track" / time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    options.check_out(out)
    if (out / "run.json").exists() and not args.resume:
        raise CLIError(
            f"--out {str(out)!r} already holds a run: pass --resume to continue it, or choose a "
            "new folder"
        )
    if out.is_dir() and not (out / "run.json").exists() and any(out.iterdir()):
        raise CLIError(
            f"--out {str(out)!r} holds files but no run (no run.json: not a folder of curvscope "
            f"track{', so there is nothing to resume' if args.resume else ''}): choose a new or "
            "empty folder"
        )
    return out


def _checked(s: TrackSettings) -> tuple[TrackSettings, list[str], Any]:
    """The settings with lr and momentum resolved, the measurements and the schedule."""
    from ..tracking import Schedule

    names = measurements(s.measure)
    schedule = Schedule.parse(s.schedule)
    if s.momentum is not None and s.optimizer == "sgd":
        raise CLIError("--momentum is for --optimizer momentum, nesterov or adam (beta1), not sgd")
    momentum = DEFAULT_MOMENTUM if s.momentum is None else s.momentum
    if not 0 <= momentum < 1:
        raise CLIError(f"--momentum must lie in [0, 1), got {momentum}")
    lr = DEFAULT_LR[s.optimizer] if s.lr is None else s.lr
    if s.optimizer == "adam" and "stability" in names and schedule.due(0):
        raise CLIError(
            "--measure stability with adam needs Adam's second moments, which exist from step 1 "
            "on: start the schedule at step 1 (e.g. --schedule every:25:1 or log:1:1000:10)"
        )
    return dataclasses.replace(s, lr=lr, momentum=momentum), names, schedule


def run(args: argparse.Namespace) -> int:
    """Train to --steps, printing one line per snapshot and the run folder at the end."""
    from ..tracking import TensorBoardLogger, Tracker, WandbLogger
    from ..tracking.tracker import format_line
    from ..tracking.training import THRESHOLD_NAMES, TrainingLoop, TrainingSet, build_optimizer

    started = time.perf_counter()
    s, names, schedule = _checked(settings(args))
    out = run_dir(args)
    problem_fields = ("model", "data", "loss", "seed", "dtype", "params")
    chosen = {name: getattr(s, name) for name in problem_fields}
    problem = load_problem(ProblemSpec.from_args(args, TRACK_PROBLEM, **chosen), shard=False)
    model = problem.model
    if problem.device is not None:
        model.to(problem.device)
    training = TrainingSet(problem.data, problem.unpack, s.batch_size, s.seed, problem.device)
    optimizer = build_optimizer(model, s.optimizer, s.lr, s.momentum)
    train = {
        "model": s.model,
        "data": s.data,
        "loss": s.loss,
        "optimizer": s.optimizer,
        "lr": s.lr,
        "momentum": s.momentum if s.optimizer != "sgd" else 0.0,
        "batch_size": s.batch_size,
        "num_samples": training.num_samples,
        "seed": s.seed,
    }
    operator_options: dict[str, Any] = {
        "keep_graphs": KEEP_GRAPHS[args.keep_graphs],
        "allow_tf32": args.allow_tf32,
    }
    if problem.unpack is not None:
        operator_options["unpack_batch"] = problem.unpack
    if problem.device is not None:
        operator_options["device"] = problem.device
    sinks: list[Any] = (
        [TensorBoardLogger(args.tensorboard, images=True)] if args.tensorboard else []
    )
    if args.wandb:  # offline unless WANDB_MODE says otherwise
        wandb_config = {"train": train, "schedule": schedule.spec, "measurements": names}
        sinks.append(WandbLogger(args.wandb, images=True, config=wandb_config))
    tracker = Tracker(
        out,
        problem.loss_fn,
        training.batches,
        schedule=schedule,
        measurements=names,
        top_k=s.top_k,
        density_iters=s.density_iters,
        density_probes=s.density_probes,
        trace_probes=s.trace_probes,
        seed=s.seed,
        params=s.params,
        dtype=problem.dtype,
        progress=False,
        resume=args.resume,
        extra={
            "batch_size": s.batch_size or training.num_samples,
            "ntk_method": s.ntk_method,
            "ntk_probes": s.ntk_probes,
            "train": train,
        },
        operator_options=operator_options,
        loggers=sinks,
    )
    loop = TrainingLoop(model, problem.loss_fn, training, optimizer, tracker, s.seed, train)
    with tracker, loop:
        start = loop.start_step(args.resume)
        kind = "full batch" if training.full_batch else f"batches of {s.batch_size}"
        print(
            f"curvscope track: {s.optimizer} (lr {s.lr:g}"
            + (f", momentum {s.momentum:g}" if s.optimizer != "sgd" else "")
            + f") on {training.num_samples:,} samples in {kind}, steps {start} to {args.steps}, "
            f"snapshots {schedule.spec}: {', '.join(names)}",
            flush=True,
        )
        threshold = THRESHOLD_NAMES[s.optimizer]
        bar = options.progress(
            args, total=args.steps, initial=min(start, args.steps), desc="training", unit="step"
        )
        with bar:
            snapshots = loop.run(
                start,
                args.steps,
                on_snapshot=lambda snap: bar.write(
                    format_line(snap.step, snap.scalars, snap.notes, threshold)
                ),
                on_step=lambda step: bar.update(1),
            )
    print(f"  snapshots {snapshots} taken now, {len(tracker.completed_steps)} in the run")
    print(f"  time      {time.perf_counter() - started:.1f} s")
    print(f"  plot      curvscope plot {shlex.quote(str(out))}")
    if args.tensorboard:
        print(f"  view      tensorboard --logdir {shlex.quote(args.tensorboard)}")
    print(f"run folder: {out}")
    jsonout.emit(
        args,
        {
            "problem": jsonout.model_fields(problem, s.params, train["num_samples"]),
            "training": {**train, "steps": args.steps, "schedule": schedule.spec, "measure": names},
            **jsonout.run_fields(out, args),
            "snapshots_taken": snapshots,
            "files": [out / "run.json"],
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
