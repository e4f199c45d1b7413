"""The Celery application that carries VM tasks from sessions to backup proxies.

Sessions send, proxies (:mod:`backupd.proxy`) consume; both build the app here from
``[proxies]``, so the task name, the queues and the delivery settings are the same on both
sides. The broker carries only ``(session id, VM task id)``: the PostgreSQL state DB stays the
one control plane (task status, stop requests, VM locks), and no result backend is used.

Delivery is at most once (Celery's default early acknowledgement): a message is acknowledged
when a proxy's worker thread starts it, so a proxy that dies mid-task never has its task
redelivered to another (``acks_late`` with long tasks would run it twice, and take a second
snapshot). A message a dead proxy had reserved but not started is redelivered, which is
harmless: a proxy runs a task only after claiming its row in the state DB
(:meth:`backupd.state.StateStore.claim_task`), once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    from backupd.config import ProxiesConfig

#: the Celery task name of a VM task; its arguments: ``[session id, VM task id]``
VM_TASK = "backupd.vm_task"


def queue_name(pool: str) -> str:
    """The broker queue of a proxy pool (``backupd.pool.NAME``)."""
    return f"backupd.pool.{pool}"


def celery_app(proxies: "ProxiesConfig") -> "Celery":
    """A Celery app on the broker of ``[proxies]``.

    Settings (Celery 5 names): ``task_acks_late`` False (at most once, see the module
    docstring); ``worker_prefetch_multiplier`` 1 (a proxy reserves no more messages than it
    has worker threads); results ignored; JSON only; broker connection retried for ever, on
    start too (a proxy waits for the broker rather than exiting).

    :raises ConfigError: ``broker_password_env`` names an unset variable.
    """
    from celery import Celery

    app = Celery("backupd", broker=proxies.connect_url(), set_as_current=False)
    app.conf.update(
        task_acks_late=False,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=queue_name("default"),
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=10,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_disable_rate_limits=True,
    )
    return app
