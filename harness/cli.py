"""Command line: run, list, report, plot.  `python -m harness --help`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from harness import interrupts
from harness.errors import HarnessError
from harness.selection import METRICS

# The embedded default: bounds, a classic and the flagship on the 2-task QuickDraw stream.
# Measured on 2 idle CPU cores: 300-361 s in all, 3.8 min of them GMM (README, Command line).
DEFAULT_METHODS = ("finetune", "joint", "icarl", "gmm", "simplecil", "ranpac")  # the last two read GMM's cached features
DEFAULT_PROTOCOL = "quickdraw20_2x10"
DEFAULT_OUT = "results"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's own code, without the usage dump)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """Each option's default after its help, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {default})"
        return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer seed, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {value}")
    return value


def _add_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--columns", nargs="+", default=[], choices=("old_new", "top5"), metavar="C",
                        help="optional table columns: old_new (Last on the classes of earlier tasks and of the "
                             "last task, as PyCIL prints them), top5 (Class-IL top-5 Avg and Last)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description="Class-incremental learning benchmarks.")
    parser.add_argument("--plugins", action="append", default=[], metavar="PATH",
                        help="a method/protocol file or folder to import (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helpful = dict(formatter_class=_Help)

    run = sub.add_parser("run", help="train methods through a protocol; writes results, table and figures",
                         description="Train every method x seed through a protocol (each a run with its own folder "
                                     "under --out/PROTOCOL/LABEL/seedK), then write the protocol's table, sessions, "
                                     "figures and HTML page from every finished run there.",
                         epilog="example: python -m harness run --methods finetune icarl --protocol "
                                "quickdraw100_10x10 --seeds 0 1 --set icarl.memory=1000", **helpful)
    run.add_argument("--methods", nargs="+", metavar="M",
                     help="registered method names (`list` shows them) (default: " + " ".join(DEFAULT_METHODS) + ")")
    run.add_argument("--protocol", metavar="P", help=f"a registered protocol (`list`) (default: {DEFAULT_PROTOCOL})")
    run.add_argument("--seeds", nargs="+", type=_seed, metavar="K", help="one run per seed (default: 0)")
    run.add_argument("--out", metavar="DIR", help=f"results folder (default: {DEFAULT_OUT}, or the experiment "
                     "file's `out`)")
    run.add_argument("--experiment", metavar="FILE", help="a TOML file listing the sweep's rows (methods, settings, "
                     "seeds, protocol) in table order, instead of --methods/--protocol/--seeds/--set")
    run.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                     help="auto: CUDA where available, else CPU")
    run.add_argument("--epochs", type=_positive, help="epochs per task for every method")
    run.add_argument("--max-train-per-class", type=_positive, metavar="N", help="cap training samples per class")
    run.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override a declared hyperparameter: method.key=value or key=value")
    run.add_argument("--data-root", metavar="DIR", help="where datasets live (default $CIL_DATA or ~/.cache/cil-harness/data)")
    run.add_argument("--download", action="store_true", help="download missing datasets where the network allows")
    run.add_argument("--force", action="store_true", help="rerun finished runs (their results are replaced)")
    run.add_argument("--restart", action="store_true",
                     help="start unfinished runs over instead of resuming from their checkpoint")
    run.add_argument("--workers", type=_positive, default=1, help="runs in parallel (process pool)")
    run.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="ray: every run a Ray task, on a local Ray or the cluster at --ray-address")
    run.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default $RAY_ADDRESS, else a "
                     "local Ray started for this command)")
    run.add_argument("--cpus-per-run", type=_positive, default=1, metavar="N", help="CPUs each Ray task asks for, with --executor ray")
    run.add_argument("--gpus-per-run", type=float, default=0.0, metavar="G", help="with --executor ray (default 0)")
    run.add_argument("--logger", nargs="+", default=[], choices=("tensorboard", "wandb", "csv"), metavar="L",
                     help="also log loss curves, per-task accuracy and the final matrix to tensorboard, wandb "
                          "(offline without a network) or csv, in each run's folder")
    run.add_argument("--threads", type=_positive, metavar="N",
                     help="CPU threads per run (default: the cores idle before each task, so other "
                          "processes on the machine do not stall it; fix N to repeat a run bit for bit)")
    _add_columns(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
    run.add_argument("--fail-fast", action="store_true",
                     help="stop the sweep at the first run that raises, with its traceback (default: record the "
                          "failure in the run's error.json, finish the other runs, exit non-zero)")
    run.add_argument("--plugins", action="append", default=[], metavar="PATH", dest="run_plugins",
                     help="a method/protocol file or folder to import (repeatable)")

    ls = sub.add_parser("list", help="methods, protocols and which data is present; "
                                     "`list METHOD` shows a method's settings",
                        description="Without a name: every method, the Avalanche strategies not offered, every "
                                    "protocol and whether its data is present. With a method: its settings (type, "
                                    "default, allowed values) and recipes; with a protocol: its shape, class order "
                                    "and data.",
                        epilog="examples: python -m harness list | python -m harness list icarl --protocol "
                               "quickdraw100_10x10 | python -m harness list quickdraw_fscil", **helpful)
    ls.add_argument("method", nargs="?", metavar="NAME", help="a method or a protocol to show")
    ls.add_argument("--protocol", metavar="P", help="with a method: the values its settings resolve to on P")
    ls.add_argument("--data-root", metavar="DIR", help="where datasets live (default $CIL_DATA or "
                    "~/.cache/cil-harness/data)")
    ls.add_argument("--plugins", action="append", default=[], metavar="PATH", dest="run_plugins",
                    help="a method/protocol file or folder to import (repeatable)")

    check = sub.add_parser("check", help="run a method straight, twice, and killed-and-resumed on a tiny "
                                         "protocol; check matrices, score shapes and memory budget",
                           description="Does a method keep the harness's promises? Runs it on a tiny protocol in a "
                                       "temporary folder: straight, again, and killed after task 1 then resumed; "
                                       "prints ok/FAIL per promise; exit code 1 when one fails.",
                           epilog="example: python -m harness --plugins my_method.py check my_method", **helpful)
    check.add_argument("method", metavar="METHOD", help="a registered method")
    check.add_argument("--protocol", default="quickdraw20_2x10", help="the protocol to check on")
    check.add_argument("--set", action="append", nargs="+", default=[], dest="sets", metavar="KEY=VALUE",
                       help="settings to check with, as for run")
    check.add_argument("--epochs", type=_positive, default=1, help="epochs per task")
    check.add_argument("--max-train-per-class", type=_positive, default=8, help="training images per class")
    check.add_argument("--plugins", action="append", default=[], metavar="PATH", dest="run_plugins",
                       help="a method/protocol file or folder to import (repeatable)")

    report = sub.add_parser("report", help="print the paper table of finished runs",
                            description="Print the table of every finished run (summary.json) under the folders; "
                                        "failed runs are listed under the markdown table, never as rows.",
                            epilog="example: python -m harness report results/quickdraw100_10x10 --format latex",
                            **helpful)
    report.add_argument("dirs", nargs="+", metavar="DIR", help="results folders, searched recursively")
    report.add_argument("--format", default="md", choices=("md", "latex", "csv", "html"),
                        help="html: one self-contained page (figures embedded), also written by every run")
    report.add_argument("--write", action="store_true", help="also (re)write the folder's table.md/csv/tex, "
                        "sessions, figures and HTML page, as `run` does, without training or retrying failed runs")
    report.add_argument("--experiment", metavar="FILE", help="order and name the rows as this experiment file "
                        "lists them")
    report.add_argument("--plugins", action="append", default=[], metavar="PATH", dest="run_plugins",
                        help="a method/protocol file or folder to import (repeatable): the methods an experiment "
                             "file names")
    _add_columns(report)
    report.add_argument("--best", metavar="METRIC", choices=tuple(METRICS),
                        help=f"rank each method's rows by METRIC ({', '.join(METRICS)}; mean over seeds) and print "
                             "the best one's settings as an experiment-file row: for choosing settings on a "
                             "development protocol")
    report.add_argument("--sessions", action="store_true",
                        help="the accuracy after each task (session) and PD = A_1 - A_T, as few-shot CIL papers "
                             "print it (md, latex or csv; every run also writes sessions.md and sessions.csv)")

    plot = sub.add_parser("plot", help="write the figures of finished runs",
                          epilog="example: python -m harness plot results/quickdraw100_10x10 --out figures",
                          **helpful)
    plot.add_argument("dir", metavar="DIR", help="a results folder, searched recursively")
    plot.add_argument("--out", metavar="DIR", help="where figures go (default DIR/plots)")
    return parser


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _sweep_rows(args) -> list[dict]:
    """The sweep's rows (methods, protocol, overrides, seeds, epochs, max_train_per_class, name,
    where), from the command line or from --experiment, before grids are expanded."""
    from harness.params import parse_set_options

    if args.experiment is None:
        return [{"methods": args.methods or list(DEFAULT_METHODS), "protocol": args.protocol or DEFAULT_PROTOCOL,
                 "overrides": parse_set_options([item for group in args.sets for item in group]),
                 "seeds": args.seeds or [0], "epochs": args.epochs,
                 "max_train_per_class": args.max_train_per_class, "name": None, "where": ""}]
    from harness.experiment import load_experiment

    given = [flag for flag, value in (("--methods", args.methods), ("--protocol", args.protocol),
                                      ("--seeds", args.seeds), ("--set", args.sets)) if value]
    if given:
        raise HarnessError(f"--experiment lists the runs: {' and '.join(given)} cannot be given with it")
    experiment = load_experiment(args.experiment)
    if args.out is None and experiment.out:
        args.out = experiment.out
    rows = []
    for row in experiment.rows:
        for key in ("epochs", "max_train_per_class"):
            if getattr(row, key) is not None and getattr(args, key) is not None:
                raise HarnessError(f"--{key.replace('_', '-')} and the experiment file's {key} ({row.where}) both "
                                   "set it: give one of them")
        rows.append(_experiment_row(row, args.epochs, args.max_train_per_class))
    return rows


def _experiment_row(row, epochs: int | None = None, max_train_per_class: int | None = None) -> dict:
    """An experiment file's row as a sweep row; the flags fill what the row leaves unset."""
    from harness.params import parse_set_options

    return {"methods": row.methods, "protocol": row.protocol, "overrides": _in_row(row.where, parse_set_options,
                                                                                     row.sets),
            "seeds": row.seeds, "epochs": row.epochs if row.epochs is not None else epochs,
            "max_train_per_class": row.max_train_per_class if row.max_train_per_class is not None
            else max_train_per_class, "name": row.name, "where": row.where}


def _in_row(where: str, fn, *args):
    """fn(*args), its one-line error prefixed with the experiment file and row it is about."""
    try:
        return fn(*args)
    except HarnessError as exc:
        if not where:
            raise
        raise HarnessError(f"{where}: {exc}") from None


def _grid_rows(row: dict, classes: dict) -> list[dict]:
    """A row whose settings list several values: one row per combination, named by its values."""
    from harness.params import expand_grid

    combos = _in_row(row["where"], expand_grid, row["overrides"], classes)
    values = [{(m, k): v for m, k, v in combo} for combo in combos]
    swept = [key for key in values[0] if len({v[key] for v in values}) > 1]
    out = []
    for combo, chosen in zip(combos, values):
        name = row["name"]
        if name and swept:  # the file's name, then the values that tell the combinations apart
            name = f"{name} ({', '.join(f'{k}={chosen[(m, k)]}' for m, k in swept)})"
        out.append({**row, "overrides": combo, "name": name})
    return out


def _checked_rows(rows: list[dict], catalog) -> list[dict]:
    """The rows with their method classes ("classes"), protocol and settings checked, each grid
    expanded to one row per combination."""
    from harness.params import validate_set_options

    out = []
    for row in rows:
        row["classes"] = _in_row(row["where"], lambda: {m: catalog.methods.get(m)
                                                        for m in dict.fromkeys(row["methods"])})
        _in_row(row["where"], catalog.protocols.get, row["protocol"])
        for expanded in _grid_rows(row, row["classes"]):
            _in_row(row["where"], validate_set_options, expanded["overrides"], row["classes"])
            if row["epochs"] is not None:  # two sources of one setting: say which wins instead of picking one
                clash = next((o for o in expanded["overrides"] if o[1] in ("epochs", "init_epochs")), None)
                if clash is not None:
                    raise HarnessError(f"--set {'.'.join(x for x in clash[:2] if x)}={clash[2]} and --epochs "
                                       f"{row['epochs']} both set the epochs: give one of them")
            out.append(expanded)
    return out


def cmd_run(args) -> int:
    from harness import catalog as catalog_mod
    from harness import results
    from harness.planning import RunSpec, plan_run, refusal

    # Everything the user typed (or the experiment file lists) is checked before any work or any
    # write, from the catalogue: a typo answers in a moment, without importing torch.
    plugins = args.plugins + args.run_plugins
    catalog = catalog_mod.load(plugins)
    rows = _checked_rows(_sweep_rows(args), catalog)
    args.out = args.out or DEFAULT_OUT
    for failure in catalog.import_errors:  # files that define none of the chosen methods
        _say(args.quiet, f"warning: {failure}")
    n_threads = args.threads
    parallel = args.workers > 1 or args.executor == "ray"
    if n_threads is None and args.executor == "ray":  # a Ray task has the CPUs it asked for
        n_threads = args.cpus_per_run
    if n_threads is None and args.workers > 1:  # parallel runs share the cores from the start
        from harness.threads import usable_cores

        n_threads = max(1, usable_cores() // args.workers)
    specs, plans, names, order = [], [], {}, []
    for row in rows:
        for m in row["classes"]:
            for s in row["seeds"]:
                spec = RunSpec(method=m, protocol=row["protocol"], seed=s, out=args.out, device=args.device,
                               overrides=tuple(row["overrides"]), epochs=row["epochs"],
                               max_train_per_class=row["max_train_per_class"], data_root=args.data_root,
                               download=args.download, force=args.force, restart=args.restart,
                               quiet=args.quiet or parallel, plugins=tuple(args.plugins + args.run_plugins),
                               threads=n_threads, loggers=tuple(args.logger), fail_fast=args.fail_fast)
                plan = _in_row(row["where"], plan_run, spec, catalog)
                if spec not in specs:
                    specs.append(spec)
                    plans.append(plan)
                if (plan.protocol_dir, plan.label) not in order:
                    order.append((plan.protocol_dir, plan.label))
                if row["name"]:
                    names[(plan.protocol_dir, plan.label)] = row["name"]
    # A run made with other settings or code is never reused silently: refused, before any work.
    refusals = [why for spec, plan in zip(specs, plans) if (why := refusal(spec, plan))]
    if refusals:
        for line in refusals:
            print(f"error: {line}", file=sys.stderr)
        return 2

    # The input is sound: now the heavy imports, then what needs them.
    from harness import data as data_mod
    from harness.executors import run_all
    from harness.loggers import check_available
    from harness.plots import write_figures
    from harness.protocol import get_protocol
    from harness.registry import discover
    from harness.html_report import render, write_report
    from harness.report import collect_runs
    from harness.runner import resolve_device

    discover(plugins)
    resolve_device(args.device)
    results.check_output_dir(Path(args.out))
    check_available(args.logger)  # a missing package: one line before any work
    for protocol_name in dict.fromkeys(row["protocol"] for row in rows):  # missing data -> one line, exit 2
        data_mod.load_splits(get_protocol(protocol_name), args.data_root, args.download)
    for spec, plan in zip(specs, plans):
        if results.is_finished(plan.path) and not spec.force:
            _say(args.quiet, f"skip {plan.label} seed {spec.seed}: finished in {plan.path} (--force reruns it)")
    outcomes = run_all(specs, workers=args.workers, executor=args.executor, ray_address=args.ray_address,
                       cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    interrupts.check()  # a Ctrl-C swallowed in the last run: no table, exit 130

    failed = [o for o in outcomes if o.status == "failed"]
    for o in outcomes:
        if o.status == "busy":  # said even under --quiet: the command did not run it
            print(f"skip {o.label} seed {o.spec.seed}: another process is running it ({o.path})", file=sys.stderr)
    protocol_dirs = list(dict.fromkeys(results.protocol_dirname(s.protocol, s.max_train_per_class) for s in specs))
    tabulated = False
    for protocol_dir in protocol_dirs:
        table_dir = Path(args.out) / protocol_dir
        if not any(o.status in ("done", "skipped") and o.protocol_dir == protocol_dir for o in outcomes):
            continue
        tabulated = True
        try:
            runs = collect_runs([table_dir])
            if args.experiment is not None:  # the file's order and names
                runs.attrs["order"] = [label for p, label in order if p == protocol_dir]
                runs.attrs["names"] = {label: name for (p, label), name in names.items() if p == protocol_dir}
            embedded: list = []  # each figure drawn once: files, then the page
            figure_paths = write_figures(runs, table_dir / "plots", embedded)
            written = write_report(runs, table_dir, embedded=embedded, columns=tuple(args.columns)) + figure_paths
            interrupts.check()  # one a callback swallowed while they were written
        except KeyboardInterrupt:
            print(f"interrupted while writing the table and figures of {table_dir}: every run is finished; "
                  "the same command writes them again without training", file=sys.stderr)
            return 130
        print(render(runs, "md", columns=tuple(args.columns)), end="")
        _say(args.quiet, f"\nresults: {table_dir}")
        _say(args.quiet, "tables and figures:\n" + "\n".join(f"  {p}" for p in written))
    if not tabulated and not failed:
        _say(args.quiet, "no finished run to tabulate yet: other processes are running these runs")
    for o in failed:  # last, so they are what the user reads
        print(o.failure_line(), file=sys.stderr)
    if not failed:
        return 0
    if len(failed) > 1 or len(outcomes) > 1:
        print(f"{len(failed)} of {len(outcomes)} runs failed; once the cause is fixed the same command resumes "
              "them from their last checkpoint and skips the finished ones", file=sys.stderr)
    return 2 if all(o.refused for o in failed) else 1


def _show_method(catalog, name: str, protocol_name: str | None = None) -> None:
    import textwrap

    from harness.params import resolve_params

    cls = catalog.methods.get(name)
    resolved = None
    if protocol_name:
        resolved, _ = resolve_params(cls, catalog.protocols.get(protocol_name).family, (), {})
    print(f"{name}: {cls.description}\n  defined in {catalog.methods.source(name)}\n\nsettings (--set {name}.KEY=VALUE)"
          + (f", with the values they take on {protocol_name}:" if resolved else ":"))
    rows = []
    for key, param in sorted(cls.params.items()):
        kind = param.type.__name__ if param.default is not None or param.kind else "str"
        allowed = ("one of " + "|".join(map(str, param.choices)) if param.choices is not None
                   else " ".join(f"{op} {v}" for op, v in ((">=", param.low), ("<=", param.high)) if v is not None))
        value = resolved[key] if resolved else param.default
        rows.append((key, kind, _short(value), allowed, param.help))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for key, kind, value, allowed, text in rows:
        head = f"  {key:<{widths[0]}}  {kind:<{widths[1]}}  {value:<{widths[2]}}  "
        body = "; ".join(x for x in (allowed, text) if x)
        print(head + textwrap.fill(body, 100, subsequent_indent=" " * len(head)).lstrip() if body else head.rstrip())
    for family, recipe in sorted(getattr(cls, "protocol_defaults", {}).items()):
        print(f"\n{family} protocols: " + " ".join(f"{k}={v}" for k, v in recipe.items()))
    for condition, recipe in sorted(getattr(cls, "setting_defaults", {}).items()):
        print(f"\nwith {condition}: " + " ".join(f"{k}={v}" for k, v in recipe.items()))


def _short(value, width: int = 14) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _show_protocol(name: str, data_root: str | None) -> None:
    from harness import data as data_mod
    from harness.data import class_order
    from harness.errors import DataMissing
    from harness.registry import PROTOCOLS

    p = PROTOCOLS.get(name)
    print(f"{name}: {p.description or p.shape}\n  defined in {PROTOCOLS.source(name)}\n  shape: {p.shape}\n"
          f"  dataset: {p.dataset} ({p.image_size}x{p.image_size}, {p.channels} channel(s)), family {p.family}")
    try:
        splits = data_mod.load_splits(p, data_root)
    except DataMissing as exc:
        print(f"  data: missing ({exc})")
        return
    order = class_order(p, list(splits.class_names))
    names = [splits.class_names[c] for c in order]
    print(f"  data: present ({len(splits.train)} training and {len(splits.test)} test images in the dataset)")
    where = (f"explicit list" if p.class_order else f"numpy RandomState({p.class_order_seed}).permutation")
    print(f"  class order ({where}), label k = the k-th class to arrive:")
    start = 0
    for t, n in enumerate(p.classes_per_task()):
        print(f"    task {t + 1}: " + ", ".join(names[start:start + n]))
        start += n


def cmd_list(args) -> int:
    from harness import catalog as catalog_mod

    plugins = args.plugins + args.run_plugins
    if args.method:
        catalog = catalog_mod.load(plugins)
        if args.method in catalog.protocols and args.method not in catalog.methods:
            from harness.registry import discover

            discover(plugins)  # the class order comes from the dataset itself
            _show_protocol(args.method, args.data_root)
        else:
            _show_method(catalog, args.method, args.protocol)
        return 0
    catalog = catalog_mod.load(plugins, args.data_root, with_data=True)
    print("methods:")
    for name in catalog.methods.names():
        print(f"  {name:<16} {catalog.methods.get(name).description}")
    if catalog.not_offered:
        print("\nAvalanche strategies not offered:")
        for name, why in sorted(catalog.not_offered.items()):
            print(f"  {name:<19} {why}")
    print("\nprotocols:")
    for name in catalog.protocols.names():
        p = catalog.protocols.get(name)
        present = catalog.datasets.get(p.dataset, {}).get("present")
        print(f"  {name:<22} {p.shape:<44} {'data present' if present else 'data missing'}")
    for failure in catalog.import_errors:
        print(f"error: {failure}", file=sys.stderr)
    return 2 if catalog.import_errors else 0


def cmd_check(args) -> int:
    from harness import catalog as catalog_mod
    from harness.params import parse_set_options, validate_set_options

    catalog = catalog_mod.load(args.plugins + args.run_plugins)
    overrides = parse_set_options([item for group in args.sets for item in group])
    validate_set_options(overrides, {args.method: catalog.methods.get(args.method)})
    catalog.protocols.get(args.protocol)
    from harness.check import check_method, report
    from harness.registry import discover

    discover(args.plugins + args.run_plugins)
    checks = check_method(args.method, args.protocol, overrides, args.plugins + args.run_plugins, args.epochs,
                          args.max_train_per_class)
    print(report(args.method, args.protocol, checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_report(args) -> int:
    from harness.html_report import render
    from harness.report import collect_runs

    runs = collect_runs([Path(d) for d in args.dirs])
    if args.best:
        from harness.selection import render_best

        print(render_best(runs, args.best), end="")
        return 0
    if args.experiment:
        runs.attrs["order"], runs.attrs["names"] = _experiment_order(args.experiment, args.plugins + args.run_plugins)
    if args.write:  # the files `run` writes, from the runs already there: nothing trains
        from harness.plots import write_figures
        from harness.html_report import write_report

        if len(args.dirs) != 1:
            print("error: --write takes one results folder (the protocol's, e.g. results/quickdraw20_2x10)",
                  file=sys.stderr)
            return 2
        embedded: list = []
        out_dir = Path(args.dirs[0])
        figures = write_figures(runs, out_dir / "plots", embedded)  # first: the page embeds them
        written = write_report(runs, out_dir, embedded=embedded, columns=tuple(args.columns)) + figures
        print("\n".join(str(p) for p in written), file=sys.stderr)
    print(render(runs, args.format, sessions=args.sessions, columns=tuple(args.columns)), end="")
    return 0


def _experiment_order(path: str, plugins: list[str]) -> tuple[list[str], dict[str, str]]:
    """The labels an experiment file's rows (grids expanded) run as, in order, and their names."""
    from harness import catalog as catalog_mod
    from harness.experiment import load_experiment
    from harness.planning import RunSpec, plan_run

    catalog = catalog_mod.load(plugins)
    order, names = [], {}
    for row in _checked_rows([_experiment_row(row) for row in load_experiment(path).rows], catalog):
        for m in row["classes"]:
            spec = RunSpec(method=m, protocol=row["protocol"], seed=0, out=".", epochs=row["epochs"],
                           overrides=tuple(row["overrides"]), max_train_per_class=row["max_train_per_class"])
            label = _in_row(row["where"], plan_run, spec, catalog).label
            order.append(label)
            if row["name"]:
                names[label] = row["name"]
    return order, names


def cmd_plot(args) -> int:
    from harness.plots import write_figures
    from harness.report import collect_runs

    runs = collect_runs([Path(args.dir)])
    for path in write_figures(runs, Path(args.out) if args.out else Path(args.dir) / "plots"):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    interrupts.install()  # Ctrl-C and SIGTERM stop the sweep even where a callback swallows them
    args = build_parser().parse_args(argv)
    if not hasattr(args, "run_plugins"):
        args.run_plugins = []
    try:
        # No import of the methods here: each command imports what it needs, when it needs it
        # (list and the checks of run's input read the catalogue: harness.catalog).
        return {"run": cmd_run, "list": cmd_list, "check": cmd_check, "report": cmd_report,
                "plot": cmd_plot}[args.command](args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, a read-only or special file system
        if exc.errno is None:
            raise
        from harness.errors import describe_os_error

        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished task is checkpointed; the same command resumes", file=sys.stderr)
        return 130
