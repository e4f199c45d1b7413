"""The long-running processes: ``backupd daemon`` (and ``daemon status``) and ``backupd proxy``
(and ``proxy list``)."""

from __future__ import annotations

import logging
import os
import sys

import click

from backupd.cli._common import TEXT, Context, configure_logging, json_option, pass_ctx, print_json

@click.group(invoke_without_command=True)
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
        sys.exit(run_daemon(click_ctx.find_object(Context).config_path))


@daemon.command("status")
@json_option
@pass_ctx
def daemon_status(ctx: Context, as_json: bool) -> None:
    """Whether a daemon runs (host, pid, since), every scheduled job's next run, and the
    running sessions."""
    from backupd.render import daemon_document, daemon_text

    document = daemon_document(ctx.service)
    if as_json:
        print_json(document)
    else:
        click.echo(daemon_text(document))



# -- backup proxies -----------------------------------------------------------------------------


@click.group(invoke_without_command=True)
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
    service = click_ctx.find_object(Context).service
    sys.exit(run_proxy(service.config, pool=pool, max_tasks=max_tasks or os.cpu_count() or 1,
                       host=host_id or default_host_id()))


@proxy.command("list")
@json_option
@pass_ctx
def proxy_list(ctx: Context, as_json: bool) -> None:
    """Backup proxies seen in the last minute: host, pid, pool, capacity, VM tasks running,
    last heartbeat."""
    from backupd.proxy_registry import LISTED_SECONDS, ProxyRegistry
    from backupd.render import proxy_document, table

    rows = [proxy_document(p) for p in ProxyRegistry(ctx.service.store).proxies(seen_within=LISTED_SECONDS)]
    if as_json:
        print_json(rows)
        return
    click.echo(table(["HOST", "PID", "POOL", "STATUS", "RUNNING", "CAPACITY", "LAST HEARTBEAT"],
                     ([r["host"], r["pid"], r["pool"], r["status"], r["running"], r["capacity"], r["heartbeat_at"]]
                      for r in rows)))
