"""The restore commands of the ``backupd`` command line: ``restore`` (disk images into a
folder, or a whole VM onto a provider) and ``restore-point show``.

Registered on the groups of :mod:`backupd.cli` (which imports this module once its shared
options exist); thin like the rest of the CLI: the work is :class:`backupd.service.Backupd`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from backupd.cli import TEXT, _Context, _PathArg, _print_json, json_option, pass_ctx
from backupd.errors import UsageError


@click.command("show")
@click.argument("point_id", metavar="ID", type=TEXT)
@json_option
@pass_ctx
def restore_point_show(ctx: _Context, point_id: str, as_json: bool) -> None:
    """One restore point: VM (name when it was made, and id), job, session, mode, sizes, and
    the VM configuration it captured (guest OS, CPUs, memory, firmware, disks with their
    sizes, network adapters). JSON sizes are bytes."""
    from backupd.render import point_show_document, point_show_text

    repository, point = ctx.service.find_point(point_id)
    document = point_show_document(repository, point)
    if as_json:
        _print_json(document)
    else:
        click.echo(point_show_text(document))


@click.command("restore")
@click.argument("vm", type=TEXT)
@click.option("--point", "point_id", type=TEXT, help="The restore point (default: the VM's newest).")
@click.option("--to", "to_dir", type=_PathArg(file_okay=False, path_type=Path),
              help="Folder to write one raw image per disk into.")
@click.option("--to-provider", "provider_name", type=TEXT, metavar="NAME",
              help="Create a new, powered-off VM on this provider from the point's captured configuration.")
@click.option("--as", "new_name", type=TEXT, metavar="NEW_NAME", help="With --to-provider: the new VM's name.")
@click.option("--datastore", type=TEXT, help="With --to-provider: where its disks go (default: the provider's choice).")
@json_option
@pass_ctx
def restore(ctx: _Context, vm: str, point_id: str | None, to_dir: Path | None, provider_name: str | None,
            new_name: str | None, datastore: str | None, as_json: bool) -> None:
    """Restore a restore point of VM (a name, or a VM id): its disks as raw images into a
    folder (--to DIR), or the whole VM (--to-provider NAME --as NEW_NAME).

    VM names are resolved through the newest restore point made under that name, so a
    renamed VM is found under its old and its new name. A full-VM restore refuses a name the
    provider already has (exit 73) and leaves nothing behind when it fails or is interrupted;
    it prints the new VM's id.
    """
    if (to_dir is None) == (provider_name is None):
        raise UsageError("give either --to DIR (disk images) or --to-provider NAME --as NEW_NAME (a whole VM)")
    if provider_name is None:
        if new_name is not None or datastore is not None:
            raise UsageError("--as and --datastore go with --to-provider")
        _restore_images(ctx, vm, point_id, to_dir, as_json)  # type: ignore[arg-type]
        return
    if new_name is None:
        raise UsageError("--to-provider needs --as NEW_NAME, the name of the VM to create")
    point, created = ctx.service.restore_vm(vm, provider_name, new_name, point_id=point_id, datastore=datastore)
    disks = [{"key": d.key, "label": d.label, "capacity_bytes": d.capacity_bytes} for d in created.disks]
    if as_json:
        _print_json({"point": point, "provider": provider_name, "vm": {"id": created.id, "name": created.name},
                     "power_state": created.power_state, "disks": disks})
    else:
        click.echo(f"restore point {point}: created VM {created.name!r} on provider {provider_name} "
                   f"({created.power_state}, {len(disks)} disk(s))")
        click.echo(created.id)


def _restore_images(ctx: _Context, vm: str, point_id: str | None, to_dir: Path, as_json: bool) -> None:
    from backupd.progress import progress_bar

    with progress_bar(f"restoring {vm}", unit_bytes=True, enabled=not as_json and sys.stderr.isatty()) as progress:
        point, images = ctx.service.restore(vm, to_dir, point_id=point_id, progress=progress)
    if as_json:
        _print_json({"point": point, "images": [str(p) for p in images]})
    else:
        click.echo(f"restore point {point}:")
        for image in images:
            click.echo(str(image))
