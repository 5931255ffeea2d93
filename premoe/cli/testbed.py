"""`premoe testbed`: build the offline corpus, train the testbed model, measure it, ship it."""
from __future__ import annotations

import click

from premoe.cli.options import NON_NEGATIVE, POSITIVE


@click.group("testbed")
def command() -> None:
    """The embedded testbed: corpus from Debian packages, a trained Qwen3-MoE, its model card.

    \b
    premoe testbed corpus --out work/corpus
    premoe testbed train --corpus work/corpus --work work/train --out work/testbed
    premoe testbed card work/testbed --corpus work/corpus
    premoe testbed ship work/testbed --corpus work/corpus
    """


@command.command("corpus")
@click.option("--out", required=True, type=click.Path(), help="Directory to write the corpus into.")
@click.option("--domains", help="Comma-separated subset of domains (default: all).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
def corpus(out, domains, force) -> None:
    """Build the multi-domain corpus (installs missing Debian packages with apt-get, and says so)."""
    from pathlib import Path

    from premoe.fileio import check_output
    from premoe.testbed.corpus import build_corpus

    check_output(out, force=force)

    manifest = build_corpus(Path(out), domains.split(",") if domains else None, force=force)
    for name, info in manifest["domains"].items():
        sizes = ", ".join(f"{s} {v['documents']} docs/{v['bytes'] / 1e6:.2f} MB" for s, v in info["splits"].items())
        click.echo(f"{name:<10} {'trained' if info['trained'] else 'UNSEEN '}  {sizes}")
    click.echo(f"wrote {out}/manifest.json")


@command.command("train")
@click.option("--corpus", "corpus_dir", required=True, type=click.Path(), help="Corpus built by `testbed corpus`.")
@click.option("--work", required=True, type=click.Path(), help="Checkpoints, tokens and loss curve (resumable).")
@click.option("--out", required=True, type=click.Path(), help="Where to export the bf16 HF checkpoint.")
@click.option("--max-steps", type=POSITIVE, default=None, help="Training steps (default from TrainConfig).")
@click.option("--seed", type=NON_NEGATIVE, default=None)
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
def train_command(corpus_dir, work, out, max_steps, seed, force) -> None:
    """Train the tokenizer and the Qwen3-MoE (resumes from --work/ckpt.pt if present)."""
    from pathlib import Path

    from premoe.fileio import check_inputs, check_output
    from premoe.testbed.train import TrainConfig, train

    check_output(out, inputs=[corpus_dir, work], force=force)
    check_inputs(work, [corpus_dir])
    cfg = TrainConfig()
    if max_steps is not None:
        cfg.max_steps = max_steps
    if seed is not None:
        cfg.seed = seed
    path = train(Path(corpus_dir), Path(work), Path(out), cfg, force=force)
    click.echo(f"wrote {path}")


@command.command("card")
@click.argument("model", default="testbed")
@click.option("--corpus", "corpus_dir", type=click.Path(), help="Corpus dir (default: the shipped splits).")
@click.option("--windows", default=64, show_default=True, type=POSITIVE, help="Test/val windows of 256 tokens per domain.")
def card(model, corpus_dir, windows) -> None:
    """Measure per-domain perplexity and expert coverage; write README.md and card.json beside the weights."""
    from pathlib import Path

    from premoe.testbed.card import write_card

    result = write_card(model, Path(corpus_dir) if corpus_dir else None, windows=windows)
    for domain, row in result["perplexity"].items():
        click.echo(f"{domain:<10} val {row['val']:>8.2f}  test {row['test']:>8.2f}")


@command.command("ship")
@click.argument("model", type=click.Path(exists=True))
@click.option("--corpus", "corpus_dir", required=True, type=click.Path(exists=True))
def ship(model, corpus_dir) -> None:
    """Copy a trained model and the corpus's calib/val/test splits into the package."""
    from pathlib import Path

    from premoe.testbed.card import ship as ship_files

    ship_files(Path(model), Path(corpus_dir))
    click.echo("shipped into premoe/testbed/{model,corpus}")


@command.command("path")
def path() -> None:
    """Print the directory of the shipped checkpoint."""
    from premoe import testbed

    click.echo(str(testbed.path()))
