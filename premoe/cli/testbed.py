"""`premoe testbed`: build the offline corpus, train the testbed model, measure it, ship it."""
from __future__ import annotations

import click

from premoe.cli.options import NON_NEGATIVE, POSITIVE


@click.group("testbed")
def command() -> None:
    """The embedded testbeds: corpus from Debian packages, a trained Qwen3-MoE and DeepSeek-V3, their model cards.

    \b
    premoe testbed corpus --out work/corpus
    premoe testbed train --corpus work/corpus --work work/train --out work/testbed
    premoe testbed card work/testbed --corpus work/corpus
    premoe testbed ship work/testbed --corpus work/corpus
    premoe testbed train --arch deepseek_v3 --corpus work/corpus --work work/dsv3 --out work/testbed-dsv3
    premoe testbed export work/dsv3 --ship testbed-dsv3      # latest checkpoint -> shipped folder + card
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
@click.option("--arch", default="qwen3_moe", show_default=True, type=click.Choice(["qwen3_moe", "deepseek_v3"]),
              help="transformers architecture; deepseek_v3 = sigmoid router with bias balancing, groups, shared expert.")
@click.option("--max-steps", type=POSITIVE, default=None, help="Training steps (default from TrainConfig / the arch).")
@click.option("--seed", type=NON_NEGATIVE, default=None)
@click.option("--threads", type=POSITIVE, default=None, help="torch threads (default: all cores).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
def train_command(corpus_dir, work, out, arch, max_steps, seed, threads, force) -> None:
    """Train the tokenizer and the MoE (resumes from --work/ckpt.pt if present)."""
    from pathlib import Path

    from premoe.fileio import check_inputs, check_output
    from premoe.testbed.train import config_for, train

    check_output(out, inputs=[corpus_dir, work], force=force)
    check_inputs(work, [corpus_dir])
    cfg = config_for(arch, max_steps=max_steps, seed=seed, threads=threads)
    path = train(Path(corpus_dir), Path(work), Path(out), cfg, force=force)
    click.echo(f"wrote {path}")


@command.command("export")
@click.argument("work", type=click.Path(exists=True))
@click.option("--out", type=click.Path(), help="Directory to write the bf16 checkpoint into.")
@click.option("--ship", "ship_as", type=click.Choice(["testbed", "testbed-dsv3"]),
              help="Instead of --out: replace that shipped model in the package and write its card.")
def export(work, out, ship_as) -> None:
    """Export the latest checkpoint in WORK (finished or not) as a bf16 HF checkpoint."""
    from pathlib import Path

    from premoe.errors import InputError
    from premoe.testbed.card import ship_model, write_card
    from premoe.testbed.train import export_checkpoint

    if (out is None) == (ship_as is None):
        raise InputError("pass exactly one of --out DIR or --ship NAME")
    path = export_checkpoint(Path(work), Path(out) if out else Path(work) / "export")
    click.echo(f"wrote {path}")
    if ship_as:
        ship_model(path, ship_as)
        for domain, row in write_card(ship_as)["perplexity"].items():
            click.echo(f"{domain:<10} val {row['val']:>8.2f}  test {row['test']:>8.2f}")
        click.echo(f"shipped {ship_as}")


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
@click.argument("name", default="testbed", type=click.Choice(["testbed", "testbed-dsv3"]))
def path(name) -> None:
    """Print the directory of a shipped checkpoint (testbed: Qwen3-MoE; testbed-dsv3: DeepSeek-V3 router)."""
    from premoe.modeling import shipped_dir

    click.echo(str(shipped_dir(name)))
