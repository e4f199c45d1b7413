"""The ``backupd`` command line.

Thin: each command parses its options, calls :class:`backupd.service.Backupd` and prints text or
one JSON document (``--json``, on stdout and nothing else there). Errors are printed on stderr
and mapped to exit codes in one place (:func:`main`): 0 success, 1 warning, 2 failed, 3 no
running session to stop, 4 not found, 64 usage error, 73 a VM of that name exists (full-VM
restore; ``EX_CANTCREAT``), 78 config error. Each group of commands
has its module (jobs, points, hypervisor, services); what they share is in ``_common``.

Heavy modules (SQLAlchemy, the engine, the repository, rich) are imported inside the commands
that need them, so ``backupd --help`` starts fast.

Arguments are checked by their click types before anything is opened: names and messages are
UTF-8 text without control characters (:data:`TEXT`), paths are not empty, numbers are in a
stated range (``--limit`` at most :data:`MAX_LIST_LIMIT`); a session id beyond the state DB's
integers (``2**63 - 1``) is simply not found (exit 4). A simulated hypervisor call with an
argument out of range (``--disk``, ``--blocks``, ``--offset``) is a usage error (64) naming it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from backupd.cli import hypervisor, jobs, points, services
from backupd.cli._common import MAX_SESSION_ID, VM_EXISTS_EXIT, Context, PathArg, configure_logging
from backupd.errors import BackupdError

__all__ = ["MAX_SESSION_ID", "cli", "configure_logging", "main"]


def _default_config() -> str:
    from backupd.config import default_config_path

    return str(default_config_path())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c", "--config", "config_path", type=PathArg(dir_okay=False, path_type=Path),
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
    ctx.obj = Context(config_path)


for _command in (jobs.job, jobs.session, points.restore_point, points.restore, points.repository, hypervisor.vm,
                 hypervisor.sim, hypervisor.snapshot, services.daemon, services.proxy):
    cli.add_command(_command)


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
