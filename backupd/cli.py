"""The ``backupd`` command line.

Thin: each command parses its options, calls :class:`backupd.service.Backupd` and prints text or
one JSON document (``--json``, on stdout and nothing else there). Errors are printed on stderr
and mapped to exit codes in one place (:func:`main`): 0 success, 1 warning, 2 failed, 3 no
running session to stop, 4 not found, 64 usage error, 73 a VM of that name exists (full-VM
restore; ``EX_CANTCREAT``), 78 config error. The restore commands live in
:mod:`backupd.cli_restore`.

Heavy modules (SQLAlchemy, the engine, the repository, rich) are imported inside the commands
that need them, so ``backupd --help`` starts fast.

Arguments are checked by their click types before anything is opened: names and messages are
UTF-8 text without control characters (:data:`TEXT`), paths are not empty, numbers are in a
stated range (``--limit`` at most :data:`MAX_LIST_LIMIT`); a session id beyond the state DB's
integers (``2**63 - 1``) is simply not found (exit 4). A simulated hypervisor call with an
argument out of range (``--disk``, ``--blocks``, ``--offset``) is a usage error (64) naming it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from backupd.errors import BackupdError, NotFoundError, UsageError

if TYPE_CHECKING:
    from backupd.service import Backupd

#: most sessions ``session list`` prints (``--limit``)
MAX_LIST_LIMIT = 100_000
#: largest session id there can be: the state DB's integers are signed 64-bit
MAX_SESSION_ID = 2**63 - 1
#: exit code of a full-VM restore that would create a VM whose name is taken (``sysexits.h``
#: ``EX_CANTCREAT``: "a (user specified) output file cannot be created")
VM_EXISTS_EXIT = 73
#: most transient failures ``sim fault --times`` arms
MAX_FAULT_TIMES = 1_000_000


class _Text(click.ParamType):
    """A name or message from the command line: text that is valid UTF-8 (an argument whose
    bytes are not arrives with lone surrogates) and has no control characters.

    :param empty_ok: whether the empty string is accepted.
    """

    name = "text"

    def __init__(self, *, empty_ok: bool = False) -> None:
        self.empty_ok = empty_ok

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        import unicodedata

        text = str(value)
        if not text and not self.empty_ok:
            self.fail("cannot be empty", param, ctx)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(text[exc.start])  # Python hands an undecodable byte B over as U+DC00 + B
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            self.fail(f"{text!r} is not UTF-8 text ({what} at character {exc.start + 1})", param, ctx)
        control = next((char for char in text if unicodedata.category(char) == "Cc"), None)
        if control is not None:
            self.fail(f"{text!r} contains a control character ({control!r})", param, ctx)
        return text


#: a job, VM, provider or restore point name or id
TEXT = _Text()


class _PathArg(click.Path):
    """``click.Path`` that refuses the empty string (which would mean the working directory)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("cannot be empty", param, ctx)
        return super().convert(value, param, ctx)


def _session_in_range(session_id: int) -> int:
    """``session_id`` if the state DB can hold it; else :class:`NotFoundError`, as for any id
    no session has."""
    if not 1 <= session_id <= MAX_SESSION_ID:
        raise NotFoundError(f"no session {session_id}")
    return session_id


class _Context:
    """Per-invocation state: the config path, and the service opened from it on first use."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._service: Backupd | None = None

    @property
    def service(self) -> "Backupd":
        if self._service is None:
            from backupd.config import load_config
            from backupd.service import Backupd

            self._service = Backupd(load_config(self.config_path))
        return self._service


pass_ctx = click.make_pass_decorator(_Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def _print_json(document: Any) -> None:
    from backupd.render import dumps

    click.echo(dumps(document))


def _default_config() -> str:
    from backupd.config import default_config_path

    return str(default_config_path())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c", "--config", "config_path", type=_PathArg(dir_okay=False, path_type=Path),
    default=_default_config, show_default="$BACKUPD_CONFIG, else ./backupd.toml",
    help="The config file.",
)
@click.version_option(package_name="backupd")
@click.pass_context
def cli(ctx: click.Context, config_path: Path) -> None:
    """backupd: back up virtual machines into a deduplicating repository.

    Exit codes: 0 success, 1 warning, 2 failed, 3 no running session to stop, 4 not found,
    64 usage error, 73 a VM of that name exists (restore --to-provider), 78 config error.
    """
    ctx.obj = _Context(config_path)


# -- job ----------------------------------------------------------------------------------------


@cli.group()
def job() -> None:
    """Jobs: list, start, stop."""


@job.command("list")
@json_option
@pass_ctx
def job_list(ctx: _Context, as_json: bool) -> None:
    """Jobs with their VMs and last session result."""
    from backupd.render import session_summary, table

    from backupd.render import next_runs

    service = ctx.service
    last = service.store.last_results()
    upcoming = next_runs(service)
    jobs = []
    for name, settings in sorted(service.config.jobs.items()):
        session = last.get(name)
        jobs.append({
            "name": name, "provider": settings.provider, "repository": settings.repository,
            "vms": list(settings.vms), "max_parallel_vms": settings.max_parallel_vms,
            "last_session": session_summary(session) if session else None,
            "schedule": settings.schedule.describe() if settings.schedule else None,
            "next_run": upcoming.get(name),
        })
    if as_json:
        _print_json(jobs)
        return
    click.echo(table(
        ["JOB", "PROVIDER", "REPOSITORY", "VMS", "LAST SESSION", "RESULT", "NEXT RUN"],
        ([j["name"], j["provider"], j["repository"], ", ".join(j["vms"]),
          j["last_session"]["id"] if j["last_session"] else None,
          (j["last_session"]["result"] or j["last_session"]["state"]) if j["last_session"] else None,
          j["next_run"]]
         for j in jobs),
    ))


@job.command("start")
@click.argument("job_name", metavar="JOB", type=TEXT)
@click.option("--wait", is_flag=True, help="Run in the foreground with a live progress view; exit code by result.")
@click.option("--full", is_flag=True, help="Read every disk in full, whatever changed block tracking allows.")
@click.option("--retry", is_flag=True,
              help="Retry the job's last session: only its VMs that got no restore point, in job order.")
@json_option
@pass_ctx
def job_start(ctx: _Context, job_name: str, wait: bool, full: bool, retry: bool, as_json: bool) -> None:
    """Start a session of JOB and print its id.

    Without --wait the session is handed to the running daemon, or, with no daemon, runs in a
    detached background process; the command returns at once. With --wait it runs here; Ctrl-C
    asks for a graceful stop, a second Ctrl-C an immediate one.
    """
    service = ctx.service
    daemon = None if wait else service.daemon_owner()
    if retry:
        if full:
            raise UsageError("--retry repeats the last session's transfer mode; it takes no --full")
        session = service.create_retry_session(job_name, owner=daemon)
    else:
        session = service.create_session(job_name, full=full, owner=daemon)
    assert session.id is not None
    if not wait:
        if daemon is None:
            service.start_detached(session.id)
        how = f"handed to the daemon (pid {daemon[1]} on {daemon[0]})" if daemon else "detached"
        if as_json:
            _print_json({"session": session.id, "job": job_name, "detached": True,
                         "daemon": {"host": daemon[0], "pid": daemon[1]} if daemon else None,
                         "retry_of": session.retry_of})
        else:
            click.echo(f"session {session.id} started (job {job_name}, {how})")
        return
    from backupd.host import host_session
    from backupd.progress import LiveView
    from backupd.render import session_document, session_text

    if not as_json:
        click.echo(f"session {session.id} started (job {job_name})", err=True)
    if not as_json and sys.stderr.isatty():
        with LiveView(service, session.id) as view:
            result = host_session(service, session.id, tick=view.draw)
    else:
        result = host_session(service, session.id)
    store = service.store
    document = session_document(store.session(session.id), store.tasks(session.id), store.log_lines(session.id))
    if as_json:
        document = {"session": session.id, **document}  # the key every `job start --json` has
        _print_json(document)
    else:
        click.echo(session_text(document))
    sys.exit(result.exit_code)


@job.command("stop")
@click.argument("jobs", metavar="JOB...", nargs=-1, required=True, type=TEXT)
@click.option("--graceful", "mode", flag_value="graceful", default=True,
              help="Start no new VM; VMs in flight finish their restore points (default).")
@click.option("--immediate", "mode", flag_value="immediate",
              help="Cancel VMs in flight, remove this session's snapshots; result failed.")
@click.option("--message", type=_Text(empty_ok=True),
              help="Why, on one line; stored with each stopped session (at most 320 characters).")
@click.option("--drain", "drain_seconds", type=click.FloatRange(0, 86400), metavar="SECONDS",
              help="Graceful: escalate to immediate after this long (default: the job's drain_period_seconds).")
@click.option("--recursive", is_flag=True,
              help="Also stop the sessions this session's chain started, and start no more chained jobs.")
@click.option("--wait", is_flag=True, help="Wait until every stopped session has ended.")
@json_option
@pass_ctx
def job_stop(ctx: _Context, jobs: tuple[str, ...], mode: str, message: str | None, drain_seconds: float | None,
             recursive: bool, wait: bool, as_json: bool) -> None:
    """Stop the running sessions of one or more jobs, from any process."""
    from backupd.enums import StopMode

    if drain_seconds is not None and mode != "graceful":
        raise UsageError("--drain is the drain period of a graceful stop; an immediate stop has none")
    service = ctx.service
    outcomes = service.stop_jobs(list(jobs), StopMode(mode), message, drain_seconds=drain_seconds, recursive=recursive)
    stopped = [o.session for o in outcomes if o.session is not None]
    if wait:
        service.wait_stopped(stopped)  # type: ignore[arg-type]
        outcomes = service.settle_stops(outcomes)
    if as_json:
        _print_json({"stops": [
            {"job": o.job, "session": o.session, "outcome": o.outcome, "mode": o.mode.value if o.mode else None}
            for o in outcomes
        ]})
    else:
        for o in outcomes:
            if o.outcome == "stop_requested":
                click.echo(f"job {o.job}: {o.mode.value} stop requested for session {o.session}"  # type: ignore[union-attr]
                           + (" (ended)" if wait else ""))
    error = service.no_session_error(outcomes)
    if error is not None:
        raise error


# -- session ------------------------------------------------------------------------------------


@cli.group()
def session() -> None:
    """Job sessions: list, show."""


@session.command("list")
@click.option("--job", "job_name", type=TEXT, help="Only this job's sessions.")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=50, show_default=True,
              help=f"Print at most this many sessions (1 to {MAX_LIST_LIMIT:,}).")
@json_option
@pass_ctx
def session_list(ctx: _Context, job_name: str | None, limit: int, as_json: bool) -> None:
    """Sessions, newest first."""
    from backupd.render import session_summary, table

    service = ctx.service
    if job_name is not None:
        service.config.job(job_name)
    rows = [session_summary(s) for s in service.store.sessions(job_name, limit=limit)]
    if as_json:
        _print_json(rows)
        return
    click.echo(table(["ID", "JOB", "STATE", "RESULT", "STARTED", "ENDED"],
                     ([r["id"], r["job"], r["state"], r["result"], r["started_at"], r["ended_at"]] for r in rows)))


@session.command("show")
@click.argument("session_id", metavar="ID", type=int)
@json_option
@pass_ctx
def session_show(ctx: _Context, session_id: int, as_json: bool) -> None:
    """One session: state, result, stop request, and every VM in order."""
    from backupd.render import session_document, session_text

    store = ctx.service.store
    session_id = _session_in_range(session_id)
    document = session_document(store.session(session_id), store.tasks(session_id), store.log_lines(session_id))
    if as_json:
        _print_json(document)
    else:
        click.echo(session_text(document))


# -- restore points -----------------------------------------------------------------------------


@cli.group("restore-point")
def restore_point() -> None:
    """Restore points: list, show, verify, delete."""


@restore_point.command("list")
@click.option("--vm", type=TEXT, help="Only this VM's restore points.")
@click.option("--job", "job_name", type=TEXT, help="Only this job's restore points.")
@json_option
@pass_ctx
def restore_point_list(ctx: _Context, vm: str | None, job_name: str | None, as_json: bool) -> None:
    """Restore points, newest first, with mode and logical and stored bytes; damaged ones
    (manifest unreadable or truncated) are listed too, marked DAMAGED."""
    from backupd.render import damaged_point_document, point_document, size, table

    service = ctx.service
    rows = [point_document(repo, point) for repo, point in service.restore_points(vm=vm, job=job_name)]
    rows += [damaged_point_document(repo, point) for repo, point in service.damaged_points(vm=vm, job=job_name)]
    rows.sort(key=lambda row: row["id"], reverse=True)
    if as_json:
        _print_json(rows)
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
def restore_point_delete(ctx: _Context, point_ids: tuple[str, ...], as_json: bool) -> None:
    """Delete restore points (damaged ones included), then free the blocks nothing else uses."""
    deleted = ctx.service.delete_points(list(point_ids))
    if as_json:
        _print_json({"deleted": deleted})
    else:
        for point_id in deleted:
            click.echo(f"deleted restore point {point_id}")


@restore_point.command("verify")
@click.argument("point_ids", metavar="[ID ...]", nargs=-1, type=TEXT)
@click.option("--all", "verify_all", is_flag=True, help="Verify every restore point.")
@json_option
@pass_ctx
def restore_point_verify(ctx: _Context, point_ids: tuple[str, ...], verify_all: bool, as_json: bool) -> None:
    """Re-read and re-hash every block the restore points reference; report damaged points."""
    from backupd.progress import progress_bar

    if bool(point_ids) == verify_all:
        raise UsageError("give restore point ids or --all (not both)")
    with progress_bar("verifying blocks", unit_bytes=False, enabled=not as_json and sys.stderr.isatty()) as progress:
        report = ctx.service.verify(None if verify_all else list(point_ids), progress=progress)
    if as_json:
        _print_json(report)
    elif report["ok"]:
        click.echo(f"ok: {report['checked_points']} restore point(s), {report['checked_blocks']} block(s) verified")
    else:
        click.echo(f"DAMAGED: {report['damaged_blocks']} block(s); restore points affected: "
                   + ", ".join(report["damaged_points"]))
    if not report["ok"]:
        sys.exit(2)


from backupd.cli_restore import restore, restore_point_show  # noqa: E402 (uses the options above)

cli.add_command(restore)
restore_point.add_command(restore_point_show)


# -- VMs ----------------------------------------------------------------------------------------


@cli.group()
def vm() -> None:
    """VMs of the configured providers."""


@vm.command("list")
@click.option("--provider", "provider_name", type=TEXT, help="Only this provider's VMs.")
@json_option
@pass_ctx
def vm_list(ctx: _Context, provider_name: str | None, as_json: bool) -> None:
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
        _print_json(rows)
        return
    click.echo(table(["VM", "PROVIDER", "POWER", "DISKS", "SNAPSHOTS"], (
        [r["name"], r["provider"], r["power_state"], ", ".join(size(d["capacity_bytes"]) for d in r["disks"]),
         ", ".join(f"{s['id']} {s['name']} ({s['created_at']})" for s in r["snapshots"]) or None]
        for r in rows)))


# -- simulated hypervisor -----------------------------------------------------------------------


@cli.group()
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
@click.option("--file", "file_path", type=_PathArg(exists=True, dir_okay=False, path_type=Path),
              help="Write this file's bytes ...")
@click.option("--offset", type=click.IntRange(min=0), help="... at this byte offset.")
@json_option
@pass_ctx
def sim_write(ctx: _Context, vm: str, provider_name: str | None, disk: int, blocks: int | None, seed: int | None,
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
        _print_json({"vm": vm, "disk": disk, "extents": written})
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
def sim_fault(ctx: _Context, vm: str, provider_name: str | None, op: str | None, times: int, permanent: bool,
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
        _print_json({"vm": vm, "faults": armed, "paused": paused})
    else:
        held = ", ".join(f"{name} ({calls} call(s) blocked)" for name, calls in paused.items())
        click.echo(f"{vm}: faults armed: {armed or 'none'}; paused: {held or 'none'}")


@sim.command("rename")
@click.argument("old", type=TEXT)
@click.argument("new", type=TEXT)
@provider_option
@json_option
@pass_ctx
def sim_rename(ctx: _Context, old: str, new: str, provider_name: str | None, as_json: bool) -> None:
    """Rename a VM as vCenter would: its id, disks, snapshots and CBT stay, so its restore
    point chain goes on. Rename it in the config too (a config entry still called OLD declares
    a new VM), and in the jobs' VM lists."""
    provider = ctx.service.simulated_provider(old, provider_name)
    vm = provider.rename_vm(old, new)
    if as_json:
        _print_json({"vm": {"id": vm.id, "name": vm.name}, "old_name": old, "provider": provider.name})
    else:
        click.echo(f"{old}: renamed {vm.name} (id {vm.id})")


@sim.command("cbt-reset")
@click.argument("vm", type=TEXT)
@provider_option
@json_option
@pass_ctx
def sim_cbt_reset(ctx: _Context, vm: str, provider_name: str | None, as_json: bool) -> None:
    """Reset changed block tracking: earlier changeIds become invalid (next transfer is full)."""
    provider = ctx.service.simulated_provider(vm, provider_name)
    provider.reset_cbt(vm)
    if as_json:
        _print_json({"vm": vm, "cbt_reset": True})
    else:
        click.echo(f"{vm}: changed block tracking reset")


# -- daemon -------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.pass_context
def daemon(click_ctx: click.Context) -> None:
    """Run the daemon in the foreground (schedules, chains, retries, recovery); `status` tells
    whether one runs.

    SIGTERM or Ctrl-C: graceful stop of every session with its drain period; a second one:
    immediate. SIGHUP: reload the config. Exit codes: 0 stopped, 5 another daemon runs on
    the state DB, 78 config error.
    """
    if click_ctx.invoked_subcommand is None:
        from backupd.daemon import run_daemon

        configure_logging(daemon=True)
        sys.exit(run_daemon(click_ctx.find_object(_Context).config_path))


@daemon.command("status")
@json_option
@pass_ctx
def daemon_status(ctx: _Context, as_json: bool) -> None:
    """Whether a daemon runs (host, pid, since), every scheduled job's next run, and the
    running sessions."""
    from backupd.render import daemon_document, daemon_text

    document = daemon_document(ctx.service)
    if as_json:
        _print_json(document)
    else:
        click.echo(daemon_text(document))


# -- backup proxies -----------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--pool", default="default", show_default=True, type=TEXT, help="The proxy pool whose VM tasks it takes.")
@click.option("--max-tasks", type=click.IntRange(1, 1024), default=None,
              help="VM tasks it runs at most at once (default: the number of cores).")
@click.option("--host-id", type=TEXT, default=None,
              help="The name it records as its host (default: $BACKUPD_HOST_ID, else the hostname).")
@click.pass_context
def proxy(click_ctx: click.Context, pool: str, max_tasks: int | None, host_id: str | None) -> None:
    """Run a backup proxy in the foreground: a Celery worker taking the VM tasks of a pool
    from the broker of [proxies]; `list` shows the proxies.

    SIGTERM or Ctrl-C: take no new VM task, let those running finish; a second Ctrl-C (or
    SIGQUIT): abandon them (their sessions find them "proxy lost").
    """
    if click_ctx.invoked_subcommand is not None:
        return
    from backupd.proxy import run_proxy
    from backupd.proxy_registry import host_id as default_host_id

    configure_logging(daemon=True)
    logging.getLogger("backupd.proxy").setLevel(logging.INFO)
    service = click_ctx.find_object(_Context).service
    sys.exit(run_proxy(service.config, pool=pool, max_tasks=max_tasks or os.cpu_count() or 1,
                       host=host_id or default_host_id()))


@proxy.command("list")
@json_option
@pass_ctx
def proxy_list(ctx: _Context, as_json: bool) -> None:
    """Backup proxies seen in the last minute: host, pid, pool, capacity, VM tasks running,
    last heartbeat."""
    from backupd.proxy_registry import LISTED_SECONDS, ProxyRegistry
    from backupd.render import proxy_document, table

    rows = [proxy_document(p) for p in ProxyRegistry(ctx.service.store).proxies(seen_within=LISTED_SECONDS)]
    if as_json:
        _print_json(rows)
        return
    click.echo(table(["HOST", "PID", "POOL", "STATUS", "RUNNING", "CAPACITY", "LAST HEARTBEAT"],
                     ([r["host"], r["pid"], r["pool"], r["status"], r["running"], r["capacity"], r["heartbeat_at"]]
                      for r in rows)))


# -- snapshots ----------------------------------------------------------------------------------


@cli.group()
def snapshot() -> None:
    """Snapshots backupd made: the snapshot hunter."""


@snapshot.command("hunt")
@click.option("--provider", "provider_name", type=TEXT, help="Only this provider's VMs.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@pass_ctx
def snapshot_hunt(ctx: _Context, provider_name: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove snapshots named by backupd (``backupd-JOB-SESSION``) on the jobs' VMs whose
    session has ended; snapshots without that prefix are never touched."""
    from backupd.recovery import hunt

    service = ctx.service
    found = hunt(service.config, service.store, provider_name=provider_name, dry_run=dry_run)
    rows = [{"provider": o.provider, "vm": o.vm, "snapshot": o.snapshot, "name": o.name,
             "created_at": o.created_at.isoformat() if o.created_at else None, "session": o.session,
             "action": o.action} for o in found]
    if as_json:
        _print_json(rows)
        return
    for orphan in found:
        click.echo(f"{orphan.provider}/{orphan.vm}: {orphan.describe()}")
    if not found:
        click.echo("no orphaned snapshot")


# -- entry point --------------------------------------------------------------------------------


class _OneLineFormatter(logging.Formatter):
    """Log records as ``backupd: message``; tracebacks only with ``BACKUPD_DEBUG=1``, so an
    administrator sees what went wrong once, in words."""

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802 (logging's name)
        return super().formatException(ei) if os.environ.get("BACKUPD_DEBUG") else ""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip("\n")


def configure_logging(*, daemon: bool = False) -> None:
    """Log records on stderr, one line each (:class:`_OneLineFormatter`), warnings and up;
    for the daemon, its events too (info) with their time (UTC)."""
    handler = logging.StreamHandler(sys.stderr)
    if daemon:
        formatter = _OneLineFormatter("%(asctime)s backupd: %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        logging.getLogger("backupd.daemon").setLevel(logging.INFO)
    else:
        formatter = _OneLineFormatter("backupd: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI and exit with the code the outcome maps to."""
    from providers.base import ProviderError, VmExists, VmNotFound
    from providers.simulated._errors import InvalidArgument  # light: not the whole simulator

    configure_logging()
    code = 0
    try:
        cli.main(args=argv, prog_name="backupd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("backupd: aborted", err=True)
        code = 130
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        exc.show()
        code = 64
    except BackupdError as exc:
        click.echo(f"backupd: {exc}", err=True)
        code = exc.exit_code
    except VmNotFound as exc:
        click.echo(f"backupd: {exc}", err=True)
        code = 4
    except VmExists as exc:
        click.echo(f"backupd: {exc}", err=True)
        code = VM_EXISTS_EXIT
    except InvalidArgument as exc:  # an administration call's argument out of range
        click.echo(f"backupd: {exc}", err=True)
        code = 64
    except ProviderError as exc:
        click.echo(f"backupd: provider error: {exc}", err=True)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug or an unexpected environment: never exit 1 ("warning")
        _report_unexpected(exc)
        code = 2
    sys.exit(code)


def _report_unexpected(exc: Exception) -> None:
    """One line naming the error (the state DB's own errors named as such); the traceback
    only with ``BACKUPD_DEBUG=1``."""
    import traceback

    where = "state DB error" if type(exc).__module__.startswith("sqlalchemy") else "internal error"
    click.echo(f"backupd: {where}: {type(exc).__name__}: {exc}", err=True)
    if os.environ.get("BACKUPD_DEBUG"):
        traceback.print_exception(exc)
    else:
        click.echo("backupd: run with BACKUPD_DEBUG=1 for the traceback", err=True)
