"""``p2pinfer models``: the local, content-addressed model store."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.store import NUMERIC_CLASSES, ModelStore
from .common import AppContext


def _store(app: AppContext) -> ModelStore:
    return ModelStore(app.config.models_dir)


@click.group()
def models() -> None:
    """Import, list, calibrate and remove ONNX models."""


@models.command("import")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--name", default=None, help="Human-readable name [default: the folder's name].")
@click.option("--numeric-class", type=click.Choice(NUMERIC_CLASSES), default=None,
              help="Numeric class the model is served in; verifiers must run the same one "
                   "[default: what the graph declares (GGUF imports: their quantization), else fp32-cpu].")
@click.pass_obj
def models_import(app: AppContext, directory: Path, name: str | None, numeric_class: str | None) -> None:
    """Copy a model folder into the store and print its digest."""
    record = _store(app).import_dir(directory, name=name, numeric_class=numeric_class)
    click.echo(record.digest_hex)


@models.command("list")
@click.pass_obj
def models_list(app: AppContext) -> None:
    """List stored models: digest, name, numeric class, tolerance, size."""
    records = _store(app).list()
    if not records:
        click.echo(f"no models in {app.config.models_dir}; add one with `p2pinfer models import DIR`")
        return
    for r in records:
        calibrated = "calibrated" if r.calibration else "default"
        click.echo(f"{r.digest_hex}  {r.name}  {r.numeric_class}  tol={r.tolerance:.3g} ({calibrated})  "
                   f"{r.size_bytes / 1e6:.1f} MB")


@models.command("remove")
@click.argument("digest")
@click.pass_obj
def models_remove(app: AppContext, digest: str) -> None:
    """Remove a model (by digest, unique digest prefix or name)."""
    record = _store(app).remove(digest)
    click.echo(f"removed {record.digest_hex} ({record.name})")


@models.command("calibrate")
@click.argument("digest")
@click.option("--tokens", type=click.IntRange(1, 512), default=32, show_default=True,
              help="Tokens generated per calibration prompt.")
@click.pass_obj
def models_calibrate(app: AppContext, digest: str, tokens: int) -> None:
    """Measure honest numeric drift and store tolerance = max(1e-3, 20 x worst drift)."""
    from ..runtime.calibrate import calibrate

    from ..runtime.store import CALIBRATION_PARTIAL_FILE
    from .gguf import ClickProgress

    store = _store(app)
    record = store.get(digest)
    progress = ClickProgress(f"calibrating {record.name}")
    try:
        with store.locked(record.digest_hex):  # resumes a calibration of this model cut short before
            result = calibrate(record.load(providers=["CPUExecutionProvider"]), new_tokens=tokens,
                               progress=progress, checkpoint=record.path / CALIBRATION_PARTIAL_FILE)
            store.set_calibration(record.digest_hex, result.tolerance, result.to_json())
    finally:
        progress.close()
    for variant, drift in sorted(result.variants.items()):
        click.echo(f"  {variant:32s} drift {drift:.3g}")
    click.echo(f"worst drift {result.worst_drift:.3g} -> tolerance {result.tolerance:.3g} for {record.digest_hex}")


from .gguf import import_gguf  # noqa: E402  (defined in its own module; attached to this group)

models.add_command(import_gguf)
