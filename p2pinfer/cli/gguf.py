"""``p2pinfer models import-gguf FILE``: convert a Llama-family GGUF into an ONNX model folder.

Defined as a standalone command; it is attached to the ``models`` group in ``cli/__init__.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..gguf import import_gguf as run_import


class ClickProgress:
    """A ``progress(done, total)`` callback that drives a click progress bar on stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr,
                                          show_eta=True, show_percent=True)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def ensure_default_model_with_progress(store: Any, *, first: str) -> Any:
    """The bundled default model's record: imported and calibrated on ``first`` use ("first run", "first
    start"), with a progress bar for each on stderr."""
    from ..gguf.default_model import ensure_default_model

    progress = ClickProgress(f"importing the default model ({first} only)")
    calibrating = ClickProgress(f"calibrating its tolerance ({first} only)")
    try:
        return ensure_default_model(store, progress=progress, calibration_progress=calibrating)
    finally:
        progress.close()
        calibrating.close()


@click.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Model folder to write [default: ./<GGUF file name without .gguf>].")
@click.option("--force", is_flag=True, help="Replace the output folder if it already exists.")
@click.option("--single-file", is_flag=True,
              help="Store the weights inside model.onnx instead of model.onnx.data (models under 2 GB only).")
@click.option("--weights", type=click.Choice(["native", "fp32"]), default="native", show_default=True,
              help="native: Q4_0/Q4_1/Q8_0/Q4_K/Q6_K stay block-quantized (numeric class <type>-cpu); "
                   "fp32: dequantize everything (numeric class fp32-cpu, about 4-8x larger).")
def import_gguf_command(gguf_file: Path, out_dir: Path | None, force: bool, single_file: bool, weights: str) -> None:
    """Convert a Llama-family GGUF FILE (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K) to an ONNX model folder."""
    out_dir = out_dir or Path.cwd() / gguf_file.stem
    progress = ClickProgress(f"importing {gguf_file.name}")
    try:
        result = run_import(gguf_file, out_dir, progress=progress, overwrite=force, single_file=single_file,
                            weights=weights)
    finally:
        progress.close()
    s = result.spec
    click.echo(f"imported {gguf_file.name} -> {result.out_dir} ({s.n_layers} layers, hidden {s.hidden_size}, "
               f"vocab {s.vocab_size}; {result.data_bytes / 1e6:.0f} MB of weights, numeric class "
               f"{result.numeric_class}, {result.seconds:.1f} s)")


#: The name the lead attaches to the ``models`` group: ``models.add_command(import_gguf)``.
import_gguf = import_gguf_command
