"""The ``certify import-model`` command: an external model's weights into a checkpoint with a
model card (``certlib.checkpoints.importing.import_model``), so that sweeps certify it like their own."""

from __future__ import annotations

import click

from cluster.cli.errors import UserError, user_errors


def _floats(name: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"{name}: give numbers separated by commas, got {text!r}") from None


@click.command("import-model")
@click.argument("source", required=False)
@click.option(
    "--weights",
    required=True,
    type=click.Path(dir_okay=False),
    help="The weights file (.pt, .pth, .pth.tar, .torch, .safetensors); read by torch's weights_only "
    "unpickler or as safetensors, which refuse a file that would run pickled code.",
)
@click.option(
    "--layout",
    required=True,
    type=click.Choice(["torchvision", "timm", "factory", "cohen", "levine-feizi"]),
    help="How the file is laid out: an architecture's state dict (torchvision, timm; SOURCE names it), "
    "a factory's (SOURCE is package.module:function: naming it is your consent to import and run it), "
    "or a paper's published checkpoint.",
)
@click.option("--dataset", required=True, help="The dataset the model classifies (digits, cifar10, imagenet).")
@click.option("--num-classes", type=int, help="Its class count (checked against the dataset's).")
@click.option(
    "--trained-with",
    help="The noise the model was trained with (gaussian, dssn, ...), where the layout does not say it.",
)
@click.option("--sigma", type=float, help="The sigma it was trained at, where the layout does not say it.")
@click.option("--seed", type=int, help="Its training seed (a DSSN model's offset vector: required for one).")
@click.option("--training", type=click.Choice(["standard", "stability"]), help="Its training mode (default standard).")
@click.option("--mean", help="Input normalization mean per channel, pixel scale (default: the layout's or dataset's).")
@click.option("--std", help="Input normalization std per channel, pixel scale (default: the layout's or dataset's).")
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The checkpoint to write: OUT.pt or OUT.safetensors (its card readable without loading the weights).",
)
@user_errors
def import_model_command(
    source, weights, layout, dataset, num_classes, trained_with, sigma, seed, training, mean, std, out
):
    """Wrap an external model (SOURCE: an architecture or package.module:function) into a
    checkpoint with a model card.

    \b
    certify import-model resnet18 --layout torchvision --weights r18.pth --dataset cifar10 \\
        --trained-with gaussian --sigma 0.25 -o models/r18-gaussian-0.25.safetensors
    certify import-model --layout cohen --weights models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar \\
        --dataset cifar10 -o models/cohen-0.25.pt
    """
    from certlib.checkpoints.importing import import_model, summary

    card = import_model(
        source,
        weights,
        out,
        layout=layout,
        dataset=dataset,
        num_classes=num_classes,
        trained_with=trained_with,
        sigma=sigma,
        seed=seed,
        training=training,
        mean=_floats("--mean", mean),
        std=_floats("--std", std),
    )
    click.echo(f"wrote {out}")
    click.echo(summary(card))
