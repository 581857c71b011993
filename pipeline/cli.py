"""The ``danet`` command: one sub-command per pipeline stage (``danet --help`` lists them)."""

from __future__ import annotations

import time

import typer

app = typer.Typer(
    name="danet",
    help="DANet training pipeline: shard datasets, train with Ray, evaluate, register, predict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def smoke(
    backbone: str = typer.Option("resnet18d", help="timm ResNet name"),
    num_classes: int = typer.Option(11, min=1),
    size: int = typer.Option(128, min=32, help="square input size"),
    steps: int = typer.Option(3, min=1, help="training steps on one random batch"),
) -> None:
    """Build DANet, run a few training steps on a random batch and one inference pass."""
    import torch

    from danet import DANetConfig, build_danet, segmentation_loss

    torch.manual_seed(0)
    try:
        config = DANetConfig(num_classes=num_classes, backbone=backbone)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    model = build_danet(config)
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(f"DANet-{backbone}: {n_params / 1e6:.2f} M parameters, {num_classes} classes")
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, num_classes, (2, size, size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        start = time.perf_counter()
        loss, parts = segmentation_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        detail = " ".join(f"{k}={v:.3f}" for k, v in parts.items())
        typer.echo(
            f"step {step + 1}/{steps}: loss {loss.item():.3f} ({detail}) "
            f"{time.perf_counter() - start:.2f}s"
        )
    model.eval()
    with torch.no_grad():
        out = model(x)
    typer.echo(f"eval outputs: {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
