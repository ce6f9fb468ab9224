"""``p2pinfer models``: the local, content-addressed model store."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.calibrate import SERVING_TOKENS
from ..runtime.store import NUMERIC_CLASSES, ModelStore
from .common import AppContext


def _store(app: AppContext) -> ModelStore:
    return ModelStore(app.config.models_dir)


@click.group()
def models() -> None:
    """Import, list, calibrate and remove ONNX models; list the models on offer in the network."""


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
        if r.calibrated and r.tolerance is not None:
            tolerance = f"tol={r.tolerance:.3g} (calibrated)"
        elif r.calibration_outdated:
            tolerance = (f"tol=none (calibrated by an older p2pinfer; measured again when served, or "
                         f"`p2pinfer models calibrate {r.digest_hex[:12]}`)")
        else:
            tolerance = f"tol=none (uncalibrated: `p2pinfer models calibrate {r.digest_hex[:12]}`)"
        click.echo(f"{r.digest_hex}  {r.name}  {r.numeric_class}  {tolerance}  {r.size_bytes / 1e6:.1f} MB")


@models.command("network")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
              help="Bootstrap node or peer to ask (repeatable); also read from the config.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def models_network(app: AppContext, bootstrap: tuple[str, ...], as_json: bool) -> None:
    """List the models on offer in the network: name, digest, peers serving it, free slots.

    Joins through the bootstrap nodes as a client and reads the peers' live capacity announcements.
    """
    import json

    import trio

    from ..catalog import models_on_offer
    from ..errors import P2PInferError
    from ..identity import Identity
    from ..net import NetError, Node, NodeConfig, parse_peer_multiaddr
    from ..wire import now_ms
    from .net import PEERS_FILE, check_bootstrap, read_peers_file
    from .status import table

    peers = check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
    if not peers:
        raise P2PInferError("no bootstrap address: pass --bootstrap MULTIADDR (printed by `p2pinfer bootstrap`)")

    async def ask() -> list:
        config = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=tuple(peers), role="client")
        try:
            async with Node(Identity.generate(), config) as node:
                with trio.move_on_after(10):
                    async with trio.open_nursery() as nursery:
                        for addr in peers:
                            nursery.start_soon(node.sync_announcements, parse_peer_multiaddr(addr).peer_id)
                return models_on_offer(a for a in node.table.live(now_ms()) if a.peer_id != node.peer_id)
        except NetError as exc:
            raise P2PInferError(f"could not join the network: {exc}; check the --bootstrap address") from None

    offers = trio.run(ask)
    if as_json:
        click.echo(json.dumps([{"name": m.name, "digest": m.digest.hex(), "peers": m.peers,
                                "free_slots": m.free_slots, "total_slots": m.total_slots} for m in offers], indent=2))
        return
    if not offers:
        click.echo("no model on offer: no peer has announced one yet (peers announce within seconds of starting)")
        return
    click.echo(table(("model", "digest", "peers", "free slots"), [
        (m.name, m.digest.hex()[:16], m.peers, f"{m.free_slots} of {m.total_slots}") for m in offers]))
    click.echo("(use the name or a digest prefix of 8+ hex digits with `p2pinfer generate --model`)")


@models.command("remove")
@click.argument("digest")
@click.pass_obj
def models_remove(app: AppContext, digest: str) -> None:
    """Remove a model (by digest, unique digest prefix or name)."""
    record = _store(app).remove(digest)
    click.echo(f"removed {record.digest_hex} ({record.name})")


@models.command("calibrate")
@click.argument("digest")
@click.option("--tokens", type=click.IntRange(1, 512), default=SERVING_TOKENS, show_default=True,
              help="Tokens generated per calibration prompt.")
@click.pass_obj
def models_calibrate(app: AppContext, digest: str, tokens: int) -> None:
    """Measure honest numeric drift and store tolerance = max(1e-5, 4 x worst drift), and per path the near-tie
    detector's width = max(1e-5, 4 x that path's worst distance to the float64 reference)."""
    from .gguf import ClickProgress

    store = _store(app)
    record = store.get(digest)
    progress = ClickProgress(f"calibrating {record.name}")
    try:
        result = store.calibrate(record.digest_hex, tokens=tokens, progress=progress)
    finally:
        progress.close()
    for variant, drift in sorted(result.variants.items()):
        click.echo(f"  {variant:32s} drift {drift:.3g}")
    click.echo(f"worst drift {result.worst_drift:.3g} -> tolerance {result.tolerance:.3g} for {record.digest_hex}")
    for path, width in sorted(result.tie_tolerances.items()):
        click.echo(f"  near-tie width {width:.3g} on {path}")


from .gguf import import_gguf  # noqa: E402  (defined in its own module; attached to this group)

models.add_command(import_gguf)
