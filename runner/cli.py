"""The command line: quantbench run | validate | collect | report.

Its exit codes are in EPILOG, which `quantbench --help` prints: 0 ok, 1 a variant failed, 2 a bad
job file or usage (nothing run or written), 3 a result measured but not written, 130 or 143 a run
stopped by a signal, 141 a closed output pipe.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_LOST = 3  # a result or study measured but not written: its printed lines are all that is left
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell tool killed by it

# What `quantbench --help` says after the commands: the module docstring's exit codes, as a list.
EPILOG = """exit codes:
  0    every variant ok or skipped; validate: every job file is valid
  1    run: a variant failed (the others still ran and were written)
       or the cluster's head died mid-run (it prints the --resume command)
  2    a bad job file or usage: nothing was run and nothing was written; collect and report:
       nothing to collect, or a --baseline that names no variant of the results
  3    run: a result was measured but its file could not be written (a full disk): its
       progress line and the table are its only record; the sweep went on
  130  run stopped by Ctrl-C (SIGINT), 143 by SIGTERM: the finished results are kept, and it
       prints the --resume command that finishes the sweep
  141  the output pipe closed early (quantbench validate … | head)

`quantbench COMMAND --help` gives a command's arguments. Docs, in the repository: README.md,
docs/commands.md (every command and option), docs/job-file.md (the job file), docs/results.md
(the result files, collect's JSON), docs/report.md (the report and the verdict).
"""


def _version() -> str:
    """The installed package's version; a checkout run without installing has none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantbench")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more: nan or inf would wait forever, a negative wait means
    nothing."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, found {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a finite number of seconds, 0 or more; found {text!r}"
        )
    return value


# Ray puts its unix sockets at TEMP/session_<date>_<time>_<microseconds>_<pid>/sockets/plasma_store,
# and a socket's path may hold at most 107 bytes: the session part takes up to 66 of them.
RAY_SOCKET_PATH_MAX, RAY_SESSION_PART = 107, 66


def _ray_temp_dir(text: str) -> str:
    """A folder Ray can start in: a longer path fails in Ray's start with a traceback, a file as
    well."""
    if not text.strip():  # Path("") is the current folder: Ray's sessions would land there unasked
        raise argparse.ArgumentTypeError("expected a folder, found an empty string")
    path = Path(text).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"{existing} is a file, not a folder: name a folder (Ray creates it "
            "if it does not exist)"
        )
    longest = RAY_SOCKET_PATH_MAX - RAY_SESSION_PART
    if len(str(path).encode()) > longest:
        raise argparse.ArgumentTypeError(
            f"{text} is {len(str(path).encode())} bytes long as an absolute path; Ray's socket "
            "paths below it would "
            f"pass the 107-byte limit of a unix socket: name a folder of at most {longest} bytes, "
            "e.g. under /tmp"
        )
    return str(path)


def _wait_seconds(text: str) -> float:
    try:
        float(text)
    except ValueError:  # `run --wait-for-lock job.yaml` reads the job file as SECONDS
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, found {text!r} (without SECONDS, "
            "put --wait-for-lock after the job files)"
        ) from None
    return _seconds(text)


def _width(text: str) -> int:
    from runner.collect import MIN_WIDTH

    if not text.isdigit() or int(text) < MIN_WIDTH:
        raise argparse.ArgumentTypeError(
            f"expected a number of columns, {MIN_WIDTH} or more; found {text!r}"
        )
    return int(text)


def _names(text: str) -> list[str]:
    """A comma-separated list of names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, found {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantbench",
        description="What quantization does to a model: job files (YAML) in, each quantized\n"
        "variant run on a CPU or GPU worker through Ray, results compared in tables and a report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"quantbench {_version()}",
        help="print quantbench's version and exit",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND"
    )
    _add_run(commands)
    validate = commands.add_parser(
        "validate", help="check job files and print the variants they expand to"
    )
    validate.add_argument("jobs", nargs="+", type=Path, help="job files (YAML)")
    _add_collect_and_report(commands)
    return parser


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run", help="validate, run every variant, write results, print the table"
    )
    run.add_argument("jobs", nargs="+", type=Path, help="job files (YAML)")
    run.add_argument(
        "--results", type=Path, default=Path("results"), help="results folder (default: results/)"
    )
    run.add_argument(
        "--address", help="Ray cluster address (else RAY_ADDRESS, else an embedded local cluster)"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="keep the ok results of the same job spec, rerun the rest (replacing their files)",
    )
    run.add_argument(
        "--ray-temp-dir",
        type=_ray_temp_dir,
        help="temporary folder of an embedded Ray cluster "
        f"(at most {RAY_SOCKET_PATH_MAX - RAY_SESSION_PART} bytes long: Ray's sockets go below it)",
    )
    run.add_argument(
        "--placement-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long to wait for a node that can run a variant before it is skipped "
        "(default: 0 on the embedded cluster, 30 on a cluster given by address)",
    )

    run.add_argument(
        "--machine",
        metavar="NAME",
        help="the label that names this machine in the tables' columns in place of its host name "
        "(default: QUANTBENCH_MACHINE, else the host name)",
    )
    run.add_argument(
        "--wait-for-lock",
        type=_wait_seconds,
        nargs="?",
        const=float("inf"),
        metavar="SECONDS",
        help="when another run is writing a job's results folder, wait for it (at most SECONDS for "
        "each folder; without SECONDS until it ends) instead of stopping with exit code 2",
    )


def _add_collect_and_report(commands) -> None:
    collect = commands.add_parser(
        "collect", help="the comparison table of the results under folders"
    )
    collect.add_argument(
        "folders", nargs="+", type=Path, help="results folders (searched below) or result files"
    )
    collect.add_argument(
        "--format",
        choices=["table", "markdown", "csv", "json"],
        default="table",
        help="table: text fitted to the terminal (default); markdown, csv, json: whole",
    )
    collect.add_argument(
        "--baseline", help="variant to compare against (default: the job's baseline)"
    )
    collect.add_argument(
        "--width",
        type=_width,
        metavar="N",
        help="fit the text table in N columns (default: COLUMNS, else the terminal's, else 80)",
    )
    collect.add_argument(
        "--variants",
        type=_names,
        metavar="A,B",
        help="show only these variants (column or variant names) and the baseline",
    )
    collect.add_argument(
        "--metrics",
        type=_names,
        metavar="A,B",
        help="show only these metric rows (a row's label, or the start of one)",
    )

    report = commands.add_parser(
        "report", help="one self-contained HTML file with the table, plots and verdict"
    )
    report.add_argument(
        "folders", nargs="+", type=Path, help="results folders (searched below) or result files"
    )
    report.add_argument(
        "--out",
        type=Path,
        help="the HTML file (default: report.html in the first folder); "
        "its PNGs go into <name>_figures/ beside it",
    )
    report.add_argument(
        "--baseline", help="variant to compare against (default: the job's baseline)"
    )


def _plans(paths: list[Path]):
    from runner.plan import plan_job

    return [plan_job(path) for path in paths]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from runner.fields import SpecError
    from runner.folders import ResultsError

    try:
        if args.command == "validate":
            from runner.plan import describe_plan

            for plan in _plans(args.jobs):
                print(describe_plan(plan))
            return EXIT_OK
        if args.command == "collect":
            return _collect(args)
        if args.command == "report":
            return _report(args)
        return _run(args, argv)
    except (SpecError, ResultsError) as error:
        print(f"quantbench: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `quantbench validate … | head`: the reader has all it wanted
        # Else Python complains at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConnectionError as error:  # e.g. no Ray cluster at --address
        print(f"quantbench: cannot reach the Ray cluster: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args, argv: list[str] | None) -> int:
    from runner.measure import MACHINE_VARIABLE

    if not args.machine:
        return _run_sweep(args, argv)
    # The embedded cluster's workers inherit it, and dispatch passes it on to a joined cluster's.
    before = os.environ.get(MACHINE_VARIABLE)
    os.environ[MACHINE_VARIABLE] = args.machine
    try:
        return _run_sweep(args, argv)
    finally:
        if before is None:
            os.environ.pop(MACHINE_VARIABLE, None)
        else:
            os.environ[MACHINE_VARIABLE] = before


def _run_sweep(args, argv: list[str] | None) -> int:
    from runner import interrupt

    plans = []
    try:
        # From the start: a Ctrl-C while the job files are read is no traceback either.
        with interrupt.handled():
            plans = _plans(args.jobs)
            _check_names(plans)
            from runner import sweep  # after validation: a bad job file is told without Ray

            report = sweep.run_sweep(
                plans,
                args.results,
                args.resume,
                args.address,
                ray_temp_dir=args.ray_temp_dir,
                placement_timeout_s=args.placement_timeout,
                lock_wait_s=args.wait_for_lock,
                command=_command_line(argv),
            )
    except KeyboardInterrupt:  # interrupt.Interrupted, or Ray's own for it
        print(_stopped(f"by {interrupt.signal_name()}", args, argv, plans), file=sys.stderr)
        return interrupt.exit_code()
    except interrupt.HeadLost as lost:
        print(_stopped(f"because {lost}", args, argv, plans), file=sys.stderr)
        return EXIT_FAILED
    sweep.print_table(report, plans)
    print(report.split())
    for note in sweep.stale_report_notes(args.results, [plan.spec.name for plan in plans]):
        print(note)
    if report.lost_any:
        return _lost(report, argv)
    if report.failed:
        print(
            "To rerun what failed (it keeps the ok results and runs the rest): "
            f"{_resume_command(argv)}"
        )
    return EXIT_FAILED if report.failed else EXIT_OK


def _lost(report, argv: list[str] | None) -> int:
    """Results measured but not written: said last, on stderr, with how to measure them again."""
    lines = report.lost_lines()
    print(
        f"quantbench: {len(lines)} result file(s) could not be written; their lines above are "
        "all that is left of them:\n  "
        + "\n  ".join(lines)
        + "\nTo measure them again once the folder can be written (it keeps the written ok "
        f"results): {_resume_command(argv)}",
        file=sys.stderr,
    )
    return EXIT_LOST


def _check_names(plans) -> None:
    for plan in plans:
        same = [str(other.spec.file) for other in plans if other.spec.name == plan.spec.name]
        if len(same) > 1:  # their results would share one folder
            from runner.fields import SpecError

            raise SpecError(
                plan.spec.file,
                "name",
                plan.spec.name,
                "each job run together needs its own name; these files share it: "
                f"{', '.join(same)}",
            )


def _stopped(why: str, args, argv: list[str] | None, plans) -> str:
    """What a run stopped by a signal (or a head that died) kept, and the command that finishes
    it."""
    from runner.results import walk

    folders = [args.results / plan.spec.name for plan in plans]
    try:
        ok = sum(r.status == "ok" for r in walk([f for f in folders if f.is_dir()]).results)
        kept = f"{ok} ok result(s)"
    except Exception:  # a file it cannot read: what it says must not fail
        kept = "the finished results"
    return (
        f"quantbench: stopped {why}, and the variants still running with it; {kept} "
        f"are kept under {args.results}, and the variants that had not finished have no result.\n"
        f"To finish the sweep (it keeps the ok results and runs the rest): "
        f"{_resume_command(argv)}"
    )


def _resume_command(argv: list[str] | None) -> str:
    """This run's command line with --resume: it keeps the ok results and runs the rest."""
    words = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["quantbench", *words, *([] if "--resume" in words else ["--resume"])])


def _command_line(argv: list[str] | None) -> str:
    """How this run was started, as a shell would take it: said to whoever finds its lock."""
    return shlex.join(["quantbench", *(sys.argv[1:] if argv is None else argv)])


def _found(command: str, folders: list[Path], baseline: str | None) -> list | None:
    """The results under the folders, or None after saying why there are none (or why they cannot be
    used)."""
    from runner import collect

    missing = [str(f) for f in folders if not f.exists()]
    if missing:
        print(f"quantbench {command}: no such folder: {', '.join(missing)}", file=sys.stderr)
        return None
    found, skipped, unusable = collect.gather(folders)
    for file, why in unusable:
        print(f"quantbench {command}: skipped {file}: {why}", file=sys.stderr)
    if skipped:
        names = " ".join(map(str, skipped))
        print(
            f"quantbench {command}: skipped {names} (folders named {collect.SKIPPED_FOLDER} hold "
            "reference "
            f"results, not your runs); to include them, name the folder: quantbench {command} "
            f"{names}",
            file=sys.stderr,
        )
    if not found:
        print(
            f"quantbench {command}: no result files under {', '.join(map(str, folders))}",
            file=sys.stderr,
        )
        return None
    try:
        collect.check_baseline(found, baseline)
    except collect.UnknownBaseline as error:
        print(f"quantbench {command}: {error}", file=sys.stderr)
        return None
    return found


def _collect(args) -> int:
    from runner import collect

    found = _found("collect", args.folders, args.baseline)
    if found is None:
        return EXIT_USAGE
    try:
        text = collect.render(
            found, args.format, args.baseline, args.width, args.variants, args.metrics
        )
    except collect.UnknownChoice as error:
        print(f"quantbench collect: {error}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(text)
    return EXIT_OK


def _report(args) -> int:
    found = _found("report", args.folders, args.baseline)
    if found is None:
        return EXIT_USAGE
    from runner import collect
    from runner.report import write_report

    out = (
        args.out
        or (args.folders[0] if args.folders[0].is_dir() else args.folders[0].parent) / "report.html"
    )
    if out.is_dir():
        print(
            f"quantbench report: --out: {out} is a folder; name the HTML file to write, e.g. "
            f"--out {out / 'report.html'}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from runner import progress

    progress.start("report", progress.Display().show)  # a bar on a terminal, else plain lines
    try:
        rendered = write_report(
            found, out, args.baseline, studies=collect.gather_studies(args.folders)
        )
    except OSError as error:  # a folder above it is a file, or it cannot be written
        print(
            f"quantbench report: cannot write {error.filename or out}: {error.strerror or error}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    figures = (
        f"{len(rendered.figures)} figures also as PNG in {rendered.figures[0].parent}"
        if rendered.figures
        else "no figures: nothing to plot"
    )
    print(f"wrote {rendered.path} ({len(found)} result{'s' if len(found) != 1 else ''}; {figures})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
