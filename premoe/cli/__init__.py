"""The ``premoe`` command: one thin module per verb, loaded only when that verb runs.

Errors derived from :class:`premoe.errors.PremoeError` print as one line and
exit with status 2; set ``PREMOE_DEBUG=1`` to see the traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

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


def main() -> None:
    from premoe.errors import PremoeError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("premoe: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except PremoeError as e:
        if os.environ.get("PREMOE_DEBUG"):
            raise
        click.echo(f"premoe: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("premoe: interrupted", err=True)
        sys.exit(130)


def not_built(verb: str) -> click.Command:
    """A placeholder for a verb whose issue is not done yet: says so and exits non-zero."""

    @click.command(verb, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        click.echo(f"premoe {verb}: not built yet", err=True)
        sys.exit(3)

    return command
