"""The ``premoe`` command: one thin module per verb, loaded only when that verb runs.

Every failure prints one line on stderr: errors derived from
:class:`premoe.errors.PremoeError` and file-system errors (full or read-only disk) exit with status 2, a bad
option with click's status 2, anything unexpected with 70 as an "internal error"; set ``PREMOE_DEBUG=1`` to
see the traceback.
"""
from __future__ import annotations

import errno
import importlib
import os
import signal
import sys

import click

from premoe import malloc, threads

# verb -> (module, one-line help). Modules are imported lazily so `premoe --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "profile": ("premoe.cli.profile", "Measure per-domain expert utility from router logits."),
    "plan": ("premoe.cli.plan", "Choose the experts to keep (specialist or generalist)."),
    "compile": ("premoe.cli.compile", "Write the pruned checkpoint by streaming surgery on the shards."),
    "verify": ("premoe.cli.verify", "Check a compiled checkpoint against the forced-routing original."),
    "eval": ("premoe.cli.eval", "Per-domain perplexity and KL divergence of a model or plan."),
    "sweep": ("premoe.cli.sweep", "Evaluate scorers x keep ratios x domains (cached, resumable)."),
    "report": ("premoe.cli.report", "Render sweep results as HTML/Markdown with plots."),
    "store": ("premoe.cli.store", "Build and query pattern stores for task-adaptive expert retrieval."),
    "serve": ("premoe.cli.serve", "OpenAI-compatible server that retrieves and swaps experts per request."),
    "route": ("premoe.cli.route", "OpenAI-compatible router in front of per-domain servers (a fleet)."),
    "export": ("premoe.cli.export", "Convert a checkpoint to GGUF with llama.cpp's converter (and quantize)."),
    "demo": ("premoe.cli.demo", "Profile, compile, verify and evaluate the embedded testbed in one go."),
    "testbed": ("premoe.cli.testbed", "Build the offline corpus, train and measure the embedded testbed model."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name][0]).command

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, help_text) in COMMANDS.items()], col_max=12)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="premoe")
def cli() -> None:
    """premoe: compile Mixture-of-Experts checkpoints down to the experts your domains use.

    \b
    Typical flow (try it on the embedded model with `premoe demo`):
      premoe profile testbed --data testbed --out prof/
      premoe plan prof/ --keep 0.5 --domain python --out python.json
      premoe compile testbed python.json --out python-50/
      premoe verify testbed python-50/
    """


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure ends as one line on stderr and a non-zero exit (``PREMOE_DEBUG=1``: traceback)."""
    threads.configure()  # before any verb imports torch: OpenMP reads its settings once
    if "--stream" in (sys.argv[1:] if argv is None else argv):  # layer-by-layer runs: memory over CPU time
        malloc.return_freed_memory()  # before the first large free, or glibc's threshold has already risen
    previous = _terminate_like_ctrl_c()
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    """The verb, with every way it can end turned into one line and an exit status."""
    try:
        cli.main(args=argv, prog_name="premoe", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns Ctrl-C into Abort (from KeyboardInterrupt)
        cause = e if isinstance(e, KeyboardInterrupt) else e.__cause__
        if not isinstance(cause, KeyboardInterrupt):
            click.echo("premoe: aborted", err=True)
            sys.exit(130)
        signal_name = "terminated (SIGTERM)" if isinstance(cause, Terminated) else "interrupted"
        if _verb(argv) in SERVERS:  # stopping a server is how it ends, not a lost run
            click.echo(f"premoe: {_verb(argv)} stopped ({'SIGTERM' if isinstance(cause, Terminated) else 'Ctrl-C'})",
                       err=True)
        else:
            click.echo(f"premoe: {signal_name}; outputs are written atomically, rerun the same command", err=True)
        if isinstance(cause, Terminated):
            _die_of_sigterm()
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"premoe: error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"premoe: error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 -- the one place that turns any failure into one line
        if os.environ.get("PREMOE_DEBUG"):
            raise
        click.echo(f"premoe: {describe_error(e)}", err=True)
        sys.exit(2 if _is_user_error(e) else 70)


SERVERS = frozenset({"serve", "route"})  # verbs that run until stopped and write no output


def _verb(argv: list[str] | None) -> str | None:
    """The verb of a command line: its first argument that is not an option."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every writer's cleanup runs (temp dirs removed, old outputs restored)."""


def _terminate_like_ctrl_c():
    """Make SIGTERM unwind like Ctrl-C; by default it kills the process before any ``finally`` runs, leaving temp
    directories and scratch files behind. A SIGTERM the parent chose to ignore stays ignored.

    Returns the handler to restore afterwards (``main`` may run inside another program, such as a test), or None
    where nothing changed (ignored, already handled, or not the main thread, where signals cannot be set).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _die_of_sigterm() -> None:
    """End as SIGTERM's default would have, now that the cleanups ran: a supervisor (systemd, a shell) sees the
    process killed by SIGTERM, which it counts as a clean stop, rather than an exit status of 143."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    sys.exit(143)  # only where the signal is blocked


def describe_error(error: BaseException) -> str:
    """One line for any exception: premoe's own message, a file-system error with its fix, or an internal error."""
    from premoe.errors import PremoeError

    if isinstance(error, PremoeError):
        return f"error: {_one_line(str(error))}"
    if isinstance(error, OSError) and error.errno in _DISK_FIXES:
        where = f" ({error.filename})" if error.filename else ""
        return f"error: {error.strerror or error}{where}; {_DISK_FIXES[error.errno]}"
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"error: {error.strerror}{where}"
    return (f"internal error: {type(error).__name__}: {_one_line(str(error))[:300]}; "
            "rerun with PREMOE_DEBUG=1 and report it")


def _is_user_error(error: BaseException) -> bool:
    from premoe.errors import PremoeError

    return isinstance(error, (PremoeError, OSError))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# errno -> what to do about it, for writes that fail on a full, read-only or forbidden file system
_DISK_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write the output to another disk (nothing was replaced)",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write the output elsewhere (nothing was replaced)",
    errno.EROFS: "the file system is read-only: write the output to a writable directory",
    errno.EACCES: "permission denied: write the output to a directory you can write to",
    errno.EPERM: "operation not permitted: write the output to a directory you own",
}


def not_built(verb: str) -> click.Command:
    """A placeholder for a verb whose issue is not done yet: says so and exits non-zero."""

    @click.command(verb, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        click.echo(f"premoe {verb}: not built yet", err=True)
        sys.exit(3)

    return command
