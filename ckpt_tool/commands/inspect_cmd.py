"""``ckpt inspect``."""

from __future__ import annotations

import click


@click.command()
@click.argument("path", type=click.Path(dir_okay=True))
def inspect(path: str) -> None:
    """Describe a checkpoint (placeholder while the command is built)."""
    from ..reader import open_checkpoint

    ckpt = open_checkpoint(path)
    click.echo(f"{ckpt.format}: {len(ckpt.tensors)} tensors")
