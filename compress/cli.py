"""The `compress` command line: the root app, assembled from each stage's ``commands`` module, and ``main()``.
Every command validates through ``compress.config`` and reports bad input as one line on stderr with exit code 2
(DESIGN principle 6)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click
import typer

from compress.errors import CompressError
from compress.options import DEVICE, QUIET, is_number
from compress.runtime import resolve_device

# typer >= 0.29 vendors click and raises its own copies of click's exceptions: catch both families.
_EXIT, _CLICK_ERROR, _ABORT = [click.exceptions.Exit], [click.ClickException], [click.exceptions.Abort]
try:
    import typer._click.exceptions as _tce
    import typer.exceptions as _te

    _EXIT.append(_te.Exit), _CLICK_ERROR.append(_tce.ClickException), _ABORT.append(_te.Abort)
except (ImportError, AttributeError):
    pass
_EXIT, _CLICK_ERROR, _ABORT = tuple(_EXIT), tuple(_CLICK_ERROR), tuple(_ABORT)


class _Interrupted(Exception):
    """Ctrl-C, carried past typer to main()."""


class _Group(typer.core.TyperGroup):
    # typer >= 0.29 turns a KeyboardInterrupt into Exit(130), which standalone_mode=False hands back as a return
    # value main() took for success (exit 0, no message); re-raised as _Interrupted it reaches main() intact.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None


def demo(
    workdir: Path = typer.Option(Path("checkpoints/demo"), help="Where the demo writes its models."),
    steps: int = typer.Option(150, help="Fine-tuning steps per corpus."),
    density: float = typer.Option(0.1, help="Density the task vectors are pruned to."),
    stratnet_budget: int = typer.Option(64, help="True evaluations for the demo's StratNet."),
    search_budget: int = typer.Option(100, help="Evaluations of the per-request search it is timed against."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """The three jobs on bundled permissive data: Wanda 50% on stories260K, a batch of compression requests
    answered by a StratNet, fine-tune → extract → merge."""
    from compress.demo import run_demo

    run_demo(workdir, steps=steps, density=density, stratnet_budget=stratnet_budget, search_budget=search_budget,
             device=resolve_device(device), quiet=quiet)


# Top-level command or group → the stage whose ``commands.register(app)`` adds it, in registration order (typer lists
# a group's commands in the order they are added, then its sub-groups in theirs). A command line names one of them,
# and only that stage's module is imported and only its commands built: typer builds every command it is given,
# and all of them with their imports cost about a second on a 2-core machine before any work starts.
SECTIONS = {
    "bench": ("bench",),
    "io": ("extract", "apply", "inspect", "extract-lora", "convert-llama2c"),
    "demo": ("demo",),
    "merge": ("merge", "interpolate"),
    "strategy": ("batch", "strategy"),
    "serve": ("serve", "request"),
    "zoo": ("zoo",),
    "heads": ("heads",),
    "eval": ("eval",),
    "prune": ("prune",),
}
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def _root() -> None:
    pass


def build_app(command: str | None = None) -> typer.Typer:
    """The root app with every command, or with only the stage that adds top-level ``command`` (a name not in
    ``SECTION_OF`` gets every command: the help and the unknown-command error list them all)."""
    app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Compress and recombine fine-tuned transformer checkpoints.")
    # a callback keeps the app a group when it holds one command (typer would run that command as the root)
    app.callback()(_root)
    wanted = set(SECTIONS) if SECTION_OF.get(command) is None else {SECTION_OF[command]}
    for section in SECTIONS:
        if section not in wanted:
            continue
        if section == "bench":
            from compress.bench.commands import bench_app

            app.add_typer(bench_app, name="bench")
        elif section == "demo":
            app.command()(demo)
        else:
            importlib.import_module(f"compress.{section}.commands").register(app)
    return app


def __getattr__(name: str):
    if name == "app":  # the whole app, for callers that introspect it
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Options that take several values after one flag (`--models A B C`); click wants the flag repeated.
MULTI_VALUE = ("--models", "--weights", "--density", "--alpha", "--tasks", "--heads")


def expand_multi(argv: list[str]) -> list[str]:
    """`--models A B --out X` → `--models A --models B --out X` for the flags in MULTI_VALUE."""
    res, flag = [], None
    for a in argv:
        if a in MULTI_VALUE:
            flag = a
            continue
        if flag is not None and a.startswith("--"):
            flag = None
        if flag is not None and not (a.startswith("-") and not is_number(a)):
            res += [flag, a]
            continue
        flag = None
        res.append(a)
    return res


def _exit_on_sigterm() -> None:
    """SIGTERM → SystemExit(143) in the main thread, so the atomic writers' cleanup runs and no temporary is left;
    a second SIGTERM during the cleanup kills at once. A process that handles SIGTERM itself keeps its handler."""
    import signal
    import threading

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("error: terminated by SIGTERM; unfinished outputs are removed", file=sys.stderr)
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input → one line on stderr and exit code 2; never a traceback for the user's mistake."""
    _exit_on_sigterm()
    argv = expand_multi(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    cmd = typer.main.get_command(build_app(command))
    try:
        rc = cmd.main(args=argv, prog_name="compress", standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer hands a command's Exit(n) back as a value when not standalone
            sys.exit(rc)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _CLICK_ERROR as e:
        # one line, as every other error (click's usage block would add two lines around it)
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (_Interrupted, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except _ABORT:
        print("aborted", file=sys.stderr)
        sys.exit(130)


def entry() -> None:
    """The ``compress`` program: ``main()``, then a quick exit. Tearing down an interpreter that imported torch
    takes 0.4-0.7 s on the 2-core benchmark machine (module and object finalizers; a third of a 1 GB task-arithmetic
    merge), none of it needed once the output is renamed into place. So, when no other non-daemon thread is left:
    streams flushed, ``atexit`` handlers run, then ``os._exit`` with the status ``sys.exit`` would give. In-process
    callers (tests, scripts) use ``main()``, which returns or raises as usual; a program that runs this module as
    ``__main__`` inside itself and goes on afterwards sets ``COMPRESS_FAST_EXIT=0``."""
    import atexit
    import os
    import threading

    def normal_exit() -> bool:  # threads the normal exit would wait for, or a host program that goes on
        me = threading.current_thread()
        return os.environ.get("COMPRESS_FAST_EXIT") == "0" or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not me)

    try:
        main()
        code = 0
    except SystemExit as e:
        if normal_exit():
            raise
        code = e.code
    if normal_exit():
        return
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: what the normal exit would also fail to write
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    entry()
