"""``backupd job`` (list, start, stop) and ``backupd session`` (list, show)."""

from __future__ import annotations

import sys

import click

from backupd.cli._common import (
    MAX_LIST_LIMIT,
    TEXT,
    Context,
    Text,
    json_option,
    pass_ctx,
    print_json,
    session_in_range,
)
from backupd.errors import UsageError

@click.group()
def job() -> None:
    """Jobs: list, start, stop."""


@job.command("list")
@json_option
@pass_ctx
def job_list(ctx: Context, as_json: bool) -> None:
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
        print_json(jobs)
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
def job_start(ctx: Context, job_name: str, wait: bool, full: bool, retry: bool, as_json: bool) -> None:
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
            print_json({"session": session.id, "job": job_name, "detached": True,
                         "daemon": {"host": daemon[0], "pid": daemon[1]} if daemon else None,
                         "retry_of": session.retry_of})
        else:
            click.echo(f"session {session.id} started (job {job_name}, {how})")
        return
    from backupd.host import freeze_start_up_objects, host_session
    from backupd.progress import LiveView
    from backupd.render import session_document, session_text

    if not as_json:
        click.echo(f"session {session.id} started (job {job_name})", err=True)
    freeze_start_up_objects()
    if not as_json and sys.stderr.isatty():
        with LiveView(service, session.id) as view:
            result = host_session(service, session.id, tick=view.draw)
    else:
        result = host_session(service, session.id)
    store = service.store
    document = session_document(store.session(session.id), store.tasks(session.id), store.log_lines(session.id))
    if as_json:
        document = {"session": session.id, **document}  # the key every `job start --json` has
        print_json(document)
    else:
        click.echo(session_text(document))
    sys.exit(result.exit_code)


@job.command("stop")
@click.argument("jobs", metavar="JOB...", nargs=-1, required=True, type=TEXT)
@click.option("--graceful", "mode", flag_value="graceful", default=True,
              help="Start no new VM; VMs in flight finish their restore points (default).")
@click.option("--immediate", "mode", flag_value="immediate",
              help="Cancel VMs in flight, remove this session's snapshots; result failed.")
@click.option("--message", type=Text(empty_ok=True),
              help="Why, on one line; stored with each stopped session (at most 320 characters).")
@click.option("--drain", "drain_seconds", type=click.FloatRange(0, 86400), metavar="SECONDS",
              help="Graceful: escalate to immediate after this long (default: the job's drain_period_seconds).")
@click.option("--recursive", is_flag=True,
              help="Also stop the sessions this session's chain started, and start no more chained jobs.")
@click.option("--wait", is_flag=True, help="Wait until every stopped session has ended.")
@json_option
@pass_ctx
def job_stop(ctx: Context, jobs: tuple[str, ...], mode: str, message: str | None, drain_seconds: float | None,
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
        print_json({"stops": [
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


@click.group()
def session() -> None:
    """Job sessions: list, show."""


@session.command("list")
@click.option("--job", "job_name", type=TEXT, help="Only this job's sessions.")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=50, show_default=True,
              help=f"Print at most this many sessions (1 to {MAX_LIST_LIMIT:,}).")
@json_option
@pass_ctx
def session_list(ctx: Context, job_name: str | None, limit: int, as_json: bool) -> None:
    """Sessions, newest first."""
    from backupd.render import session_summary, table

    service = ctx.service
    if job_name is not None:
        service.config.job(job_name)
    rows = [session_summary(s) for s in service.store.sessions(job_name, limit=limit)]
    if as_json:
        print_json(rows)
        return
    click.echo(table(["ID", "JOB", "STATE", "RESULT", "STARTED", "ENDED"],
                     ([r["id"], r["job"], r["state"], r["result"], r["started_at"], r["ended_at"]] for r in rows)))


@session.command("show")
@click.argument("session_id", metavar="ID", type=int)
@json_option
@pass_ctx
def session_show(ctx: Context, session_id: int, as_json: bool) -> None:
    """One session: state, result, stop request, and every VM in order."""
    from backupd.render import session_document, session_text

    store = ctx.service.store
    session_id = session_in_range(session_id)
    document = session_document(store.session(session_id), store.tasks(session_id), store.log_lines(session_id))
    if as_json:
        print_json(document)
    else:
        click.echo(session_text(document))
