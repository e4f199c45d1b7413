"""``backupd restore-point`` (list, show, verify, delete), ``backupd restore`` (disk images
into a folder, or a whole VM onto a provider) and ``backupd repository gc``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from backupd.cli._common import TEXT, Context, PathArg, json_option, pass_ctx, print_json
from backupd.errors import UsageError

@click.group("restore-point")
def restore_point() -> None:
    """Restore points: list, show, verify, delete."""


@restore_point.command("list")
@click.option("--vm", type=TEXT, help="Only this VM's restore points.")
@click.option("--job", "job_name", type=TEXT, help="Only this job's restore points.")
@json_option
@pass_ctx
def restore_point_list(ctx: Context, vm: str | None, job_name: str | None, as_json: bool) -> None:
    """Restore points, newest first, with mode and logical and stored bytes; damaged ones
    (manifest unreadable or truncated) are listed too, marked DAMAGED."""
    from backupd.render import damaged_point_document, point_document, size, table

    service = ctx.service
    rows = [point_document(repo, point) for repo, point in service.restore_points(vm=vm, job=job_name)]
    rows += [damaged_point_document(repo, point) for repo, point in service.damaged_points(vm=vm, job=job_name)]
    rows.sort(key=lambda row: row["id"], reverse=True)
    if as_json:
        print_json(rows)
        return
    click.echo(table(["ID", "VM", "JOB", "SESSION", "MODE", "LOGICAL", "STORED", "CREATED"],
                     ([r["id"], r["vm"], r["job"], r["session"], "DAMAGED" if r["damaged"] else r["mode"],
                       size(r["logical_bytes"]), size(r["stored_bytes"]), r["created_at"]] for r in rows)))
    for r in rows:
        if r["damaged"]:
            click.echo(f"DAMAGED {r['id']}: {r['problem']}", err=True)


@restore_point.command("delete")
@click.argument("point_ids", metavar="ID...", nargs=-1, required=True)
@json_option
@pass_ctx
def restore_point_delete(ctx: Context, point_ids: tuple[str, ...], as_json: bool) -> None:
    """Delete restore points (damaged ones included), then free the blocks nothing else uses."""
    deleted = ctx.service.delete_points(list(point_ids))
    if as_json:
        print_json({"deleted": deleted})
    else:
        for point_id in deleted:
            click.echo(f"deleted restore point {point_id}")


@click.group("repository")
def repository() -> None:
    """Repositories: garbage collection."""


@repository.command("gc")
@click.argument("names", metavar="[NAME ...]", nargs=-1, type=TEXT)
@json_option
@pass_ctx
def repository_gc(ctx: Context, names: tuple[str, ...], as_json: bool) -> None:
    """Free now the blocks no restore point references, in the named repositories (default:
    all), instead of at the end of the first job session after ``gc_interval_seconds``.
    Exit 1 when a collection could not run: writers were busy (try again later), or a
    damaged restore point keeps every block (delete it first)."""
    results = ctx.service.collect_garbage(list(names) or None)
    rows = [{"repository": name, "removed_blocks": gc.removed_blocks, "freed_bytes": gc.freed_bytes,
             "deferred": gc.deferred, "damaged_points": list(gc.damaged_points)} for name, gc in results]
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            click.echo(_gc_line(row))
    if any(row["deferred"] or row["damaged_points"] for row in rows):
        sys.exit(1)


def _gc_line(row: dict[str, Any]) -> str:
    if row["deferred"]:
        return f"{row['repository']}: not collected: writers, a restore or a verify are busy; try again later"
    if row["damaged_points"]:
        return (f"{row['repository']}: nothing freed: damaged restore point(s) {' '.join(row['damaged_points'])} "
                "may reference any block; delete them first")
    return f"{row['repository']}: {row['removed_blocks']} block(s) freed, {row['freed_bytes']} bytes"


@restore_point.command("verify")
@click.argument("point_ids", metavar="[ID ...]", nargs=-1, type=TEXT)
@click.option("--all", "verify_all", is_flag=True, help="Verify every restore point.")
@json_option
@pass_ctx
def restore_point_verify(ctx: Context, point_ids: tuple[str, ...], verify_all: bool, as_json: bool) -> None:
    """Re-read and re-hash every block the restore points reference; report damaged points."""
    from backupd.progress import progress_bar

    if bool(point_ids) == verify_all:
        raise UsageError("give restore point ids or --all (not both)")
    with progress_bar("verifying blocks", unit_bytes=False, enabled=not as_json and sys.stderr.isatty()) as progress:
        report = ctx.service.verify(None if verify_all else list(point_ids), progress=progress)
    if as_json:
        print_json(report)
    elif report["ok"]:
        click.echo(f"ok: {report['checked_points']} restore point(s), {report['checked_blocks']} block(s) verified")
    else:
        click.echo(f"DAMAGED: {report['damaged_blocks']} block(s); restore points affected: "
                   + ", ".join(report["damaged_points"]))
    if not report["ok"]:
        sys.exit(2)



@restore_point.command("show")
@click.argument("point_id", metavar="ID", type=TEXT)
@json_option
@pass_ctx
def restore_point_show(ctx: Context, point_id: str, as_json: bool) -> None:
    """One restore point: VM (name when it was made, and id), job, session, mode, sizes, and
    the VM configuration it captured (guest OS, CPUs, memory, firmware, disks with their
    sizes, network adapters). JSON sizes are bytes."""
    from backupd.render import point_show_document, point_show_text

    repository, point = ctx.service.find_point(point_id)
    document = point_show_document(repository, point)
    if as_json:
        print_json(document)
    else:
        click.echo(point_show_text(document))


@click.command("restore")
@click.argument("vm", type=TEXT)
@click.option("--point", "point_id", type=TEXT, help="The restore point (default: the VM's newest).")
@click.option("--to", "to_dir", type=PathArg(file_okay=False, path_type=Path),
              help="Folder to write one raw image per disk into.")
@click.option("--to-provider", "provider_name", type=TEXT, metavar="NAME",
              help="Create a new, powered-off VM on this provider from the point's captured configuration.")
@click.option("--as", "new_name", type=TEXT, metavar="NEW_NAME", help="With --to-provider: the new VM's name.")
@click.option("--datastore", type=TEXT, help="With --to-provider: where its disks go (default: the provider's choice).")
@json_option
@pass_ctx
def restore(ctx: Context, vm: str, point_id: str | None, to_dir: Path | None, provider_name: str | None,
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
        print_json({"point": point, "provider": provider_name, "vm": {"id": created.id, "name": created.name},
                     "power_state": created.power_state, "disks": disks})
    else:
        click.echo(f"restore point {point}: created VM {created.name!r} on provider {provider_name} "
                   f"({created.power_state}, {len(disks)} disk(s))")
        click.echo(created.id)


def _restore_images(ctx: Context, vm: str, point_id: str | None, to_dir: Path, as_json: bool) -> None:
    from backupd.progress import progress_bar

    with progress_bar(f"restoring {vm}", unit_bytes=True, enabled=not as_json and sys.stderr.isatty()) as progress:
        point, images = ctx.service.restore(vm, to_dir, point_id=point_id, progress=progress)
    if as_json:
        print_json({"point": point, "images": [str(p) for p in images]})
    else:
        click.echo(f"restore point {point}:")
        for image in images:
            click.echo(str(image))
