"""``backupd vm`` (the providers' VMs), ``backupd sim`` (the simulated hypervisor's
administration: guest writes, faults, renames, CBT reset) and ``backupd snapshot hunt``."""

from __future__ import annotations

from pathlib import Path

import click

from backupd.cli._common import TEXT, Context, PathArg, json_option, pass_ctx, print_json
from backupd.errors import UsageError

#: most transient failures ``sim fault --times`` arms
MAX_FAULT_TIMES = 1_000_000

@click.group()
def vm() -> None:
    """VMs of the configured providers."""


@vm.command("list")
@click.option("--provider", "provider_name", type=TEXT, help="Only this provider's VMs.")
@json_option
@pass_ctx
def vm_list(ctx: Context, provider_name: str | None, as_json: bool) -> None:
    """VMs with power state, disks and current snapshots."""
    from backupd.render import size, table

    service = ctx.service
    names = [provider_name] if provider_name is not None else sorted(service.config.providers)
    rows = []
    for name in names:
        provider = service.provider(name)
        try:
            for info in provider.list_vms():
                rows.append({
                    "name": info.name, "id": info.id, "provider": name, "power_state": info.power_state,
                    "disks": [{"key": d.key, "label": d.label, "capacity_bytes": d.capacity_bytes,
                               "change_id": d.change_id} for d in info.disks],
                    "snapshots": [{"id": s.id, "name": s.name, "created_at": s.created_at.isoformat()}
                                  for s in provider.list_snapshots(info)],
                })
        finally:
            provider.close()
    if as_json:
        print_json(rows)
        return
    click.echo(table(["VM", "PROVIDER", "POWER", "DISKS", "SNAPSHOTS"], (
        [r["name"], r["provider"], r["power_state"], ", ".join(size(d["capacity_bytes"]) for d in r["disks"]),
         ", ".join(f"{s['id']} {s['name']} ({s['created_at']})" for s in r["snapshots"]) or None]
        for r in rows)))



# -- simulated hypervisor -----------------------------------------------------------------------


@click.group()
def sim() -> None:
    """The simulated hypervisor: guest writes, faults, CBT reset, renames."""


provider_option = click.option("--provider", "provider_name", type=TEXT,
                               help="The simulated provider (when several have the VM).")


@sim.command("write")
@click.argument("vm", type=TEXT)
@provider_option
@click.option("--disk", type=click.IntRange(min=0), default=0, show_default=True, help="Disk index.")
@click.option("--blocks", type=click.IntRange(min=1), help="Write this many random 1 MiB blocks at random offsets.")
@click.option("--seed", type=int, help="Seed for --blocks, for a reproducible write.")
@click.option("--file", "file_path", type=PathArg(exists=True, dir_okay=False, path_type=Path),
              help="Write this file's bytes ...")
@click.option("--offset", type=click.IntRange(min=0), help="... at this byte offset.")
@json_option
@pass_ctx
def sim_write(ctx: Context, vm: str, provider_name: str | None, disk: int, blocks: int | None, seed: int | None,
              file_path: Path | None, offset: int | None, as_json: bool) -> None:
    """Write to a VM's disk through the guest write path (changes CBT, copy-on-write)."""
    if (blocks is None) == (file_path is None):
        raise UsageError("give either --blocks K or --file PATH --offset BYTES")
    if file_path is not None and offset is None:
        raise UsageError("--file needs --offset BYTES")
    from providers.simulated import InvalidArgument

    provider = ctx.service.simulated_provider(vm, provider_name)
    try:
        if blocks is not None:
            extents = provider.write_random_blocks(vm, disk=disk, blocks=blocks, seed=seed)
        else:
            extents = [provider.write_data(vm, disk=disk, offset=offset, data=file_path.read_bytes())]  # type: ignore[arg-type, union-attr]
    except InvalidArgument as exc:
        given = {"disk": f"--disk {disk}", "blocks": f"--blocks {blocks}", "offset": f"--offset {offset}",
                 "data": f"--file {file_path}"}.get(exc.argument or "")
        raise UsageError(f"{given}: {exc}" if given else str(exc)) from exc
    written = [{"offset": e.offset, "length": e.length} for e in extents]
    if as_json:
        print_json({"vm": vm, "disk": disk, "extents": written})
    else:
        click.echo(f"wrote {sum(e['length'] for e in written)} bytes in {len(written)} extent(s) to {vm} disk {disk}")


@sim.command("fault")
@click.argument("vm", type=TEXT)
@provider_option
@click.option("--op", type=click.Choice(["create_snapshot", "quiesce", "remove_snapshot", "read"]),
              help="The operation that fails (or, with --pause, blocks).")
@click.option("--times", type=click.IntRange(1, MAX_FAULT_TIMES), default=1, show_default=True,
              help=f"Fail the next N calls with a transient (retried) error (1 to {MAX_FAULT_TIMES:,}).")
@click.option("--permanent", is_flag=True, help="Fail every call with a non-transient error until --clear.")
@click.option("--pause", is_flag=True,
              help="Block every call of --op (read or create_snapshot), without failing, until --resume or --clear.")
@click.option("--resume", is_flag=True, help="Lift the VM's pauses (of --op only, if given); faults stay armed.")
@click.option("--clear", is_flag=True, help="Remove every fault and pause of the VM.")
@json_option
@pass_ctx
def sim_fault(ctx: Context, vm: str, provider_name: str | None, op: str | None, times: int, permanent: bool,
              pause: bool, resume: bool, clear: bool, as_json: bool) -> None:
    """Arm a fault or a pause that a running job sees at its next call.

    The answer lists the armed faults and the paused ops, each paused op with the number of
    calls blocked on it right now (in any process)."""
    if pause + resume + clear + permanent > 1:
        raise UsageError("give one of --permanent, --pause, --resume, --clear")
    provider = ctx.service.simulated_provider(vm, provider_name)
    if clear:
        provider.clear_faults(vm)
    elif resume:
        provider.resume(vm, op)
    elif op is None:
        raise UsageError("give --op OPERATION (or --resume, --clear)")
    elif pause:
        provider.pause(vm, op)  # InvalidArgument for an op that cannot pause: exit 64
    else:
        provider.set_fault(vm, op, times=times, permanent=permanent)
    armed = provider.faults(vm)
    paused = provider.paused(vm)
    if as_json:
        print_json({"vm": vm, "faults": armed, "paused": paused})
    else:
        held = ", ".join(f"{name} ({calls} call(s) blocked)" for name, calls in paused.items())
        click.echo(f"{vm}: faults armed: {armed or 'none'}; paused: {held or 'none'}")


@sim.command("rename")
@click.argument("old", type=TEXT)
@click.argument("new", type=TEXT)
@provider_option
@json_option
@pass_ctx
def sim_rename(ctx: Context, old: str, new: str, provider_name: str | None, as_json: bool) -> None:
    """Rename a VM as vCenter would: its id, disks, snapshots and CBT stay, so its restore
    point chain goes on. Rename it in the config too (a config entry still called OLD declares
    a new VM), and in the jobs' VM lists."""
    provider = ctx.service.simulated_provider(old, provider_name)
    vm = provider.rename_vm(old, new)
    if as_json:
        print_json({"vm": {"id": vm.id, "name": vm.name}, "old_name": old, "provider": provider.name})
    else:
        click.echo(f"{old}: renamed {vm.name} (id {vm.id})")


@sim.command("cbt-reset")
@click.argument("vm", type=TEXT)
@provider_option
@json_option
@pass_ctx
def sim_cbt_reset(ctx: Context, vm: str, provider_name: str | None, as_json: bool) -> None:
    """Reset changed block tracking: earlier changeIds become invalid (next transfer is full)."""
    provider = ctx.service.simulated_provider(vm, provider_name)
    provider.reset_cbt(vm)
    if as_json:
        print_json({"vm": vm, "cbt_reset": True})
    else:
        click.echo(f"{vm}: changed block tracking reset")



# -- snapshots ----------------------------------------------------------------------------------


@click.group()
def snapshot() -> None:
    """Snapshots backupd made: the snapshot hunter."""


@snapshot.command("hunt")
@click.option("--provider", "provider_name", type=TEXT, help="Only this provider's VMs.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@pass_ctx
def snapshot_hunt(ctx: Context, provider_name: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove snapshots named by backupd (``backupd-JOB-SESSION``) on the jobs' VMs whose
    session has ended; snapshots without that prefix are never touched."""
    from backupd.recovery import hunt

    service = ctx.service
    found = hunt(service.config, service.store, provider_name=provider_name, dry_run=dry_run)
    rows = [{"provider": o.provider, "vm": o.vm, "snapshot": o.snapshot, "name": o.name,
             "created_at": o.created_at.isoformat() if o.created_at else None, "session": o.session,
             "action": o.action} for o in found]
    if as_json:
        print_json(rows)
        return
    for orphan in found:
        click.echo(f"{orphan.provider}/{orphan.vm}: {orphan.describe()}")
    if not found:
        click.echo("no orphaned snapshot")
