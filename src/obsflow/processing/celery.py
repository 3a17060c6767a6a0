"""Runs on Celery workers: the app, its one task, and the executor that hands run IDs over.

``processing: {executor: celery, broker: URL}`` (or ``$OBSFLOW_BROKER``) makes the daemon's
executor a :class:`CeleryExecutor`: the tracker hands each queued run to it once
(:meth:`obsflow.processing.tracker.loop.TrackerLoop.dispatch`), and it publishes one
message, the task ``obsflow.run`` with the run's ID, to the queue of the run's pipeline
(its ``queue:``, else its profile's, else ``processing.queue``). ``obsflow worker``
(:mod:`obsflow.processing.worker`) consumes them and executes each run with
:func:`obsflow.processing.lifecycle.execute_run`, the same code as the daemon's own pool.

The catalog stays the source of truth: a message only says "look at run N". Its claim
(compare-and-set, queued → running with a lease) decides who executes it, so a message
delivered twice, or a run handed over again, never makes a second execution; a message
the broker lost leaves the run queued, and the tracker hands it over again after
``processing.dispatch_seconds``; a worker that dies leaves its run's lease to expire, and
the tracker queues the run again, once.

How the app is configured, and why (:func:`make_app`):

* ``task_acks_late``: a message is acknowledged when its run has ended, not when it is
  taken: a worker killed mid-run (SIGKILL, OOM, a lost machine) has not acknowledged it, so
  the broker gives it to another worker. RabbitMQ does that as soon as the dead worker's
  connection closes; Redis, which has no acknowledgements of its own, keeps every message
  taken and not yet acknowledged in a hash and puts it back in its queue after the
  ``visibility_timeout`` (below).
* ``task_reject_on_worker_lost``: when a pool process dies while the worker's main process
  lives (the OOM killer chose it), the message is put back rather than acknowledged as a
  failure.
* ``worker_prefetch_multiplier`` 1: a worker reserves no more messages than it has
  processes free; a long run never holds another one hostage while other workers idle.
* no result backend, results ignored: the catalog has every run's state and steps.
* ``broker_connection_retry_on_startup``: a worker started before its broker waits for it.
* RabbitMQ: queues are durable and messages persistent (Celery's defaults) and publishing
  waits for the broker's confirmation (``confirm_publish``): a message is either in the
  queue or :meth:`CeleryExecutor.submit` raised, and the tracker tries again.
* ``worker_cancel_long_running_tasks_on_connection_loss`` False: a run whose worker loses
  the broker for a moment runs on (its lease is in the catalog, not the broker); its
  message comes back later and is refused at the claim, at the cost of one claim.

The Redis ``visibility_timeout`` is ``processing.dispatch_seconds`` (an hour by default,
Celery's own default too). The broker's redelivery is the last line, not the first: a
dead worker's run is queued again by the tracker when its lease expires (seconds), and a
run whose message was lost is handed over again after ``dispatch_seconds``; the
redelivered message itself is harmless (the claim refuses it). A shorter timeout would
only redeliver, over and over, the message of every run that lasts longer than it; one
delay for "the broker may have lost it" is easier to reason about than two.

RabbitMQ closes a channel whose message stays unacknowledged longer than its
``consumer_timeout`` (30 minutes by default): for runs longer than that, raise it in
``rabbitmq.conf`` (``consumer_timeout = 86400000``); otherwise each such run's message is
delivered again every half hour, and refused at the claim.

Watching the workers
--------------------

Celery's own tools need only the broker's URL, no obsflow code::

    celery --broker redis://HOST:6379/0 inspect active        # the runs each worker executes
    celery --broker redis://HOST:6379/0 inspect active_queues # which queues each consumes
    celery --broker redis://HOST:6379/0 inspect stats         # processes, tasks done
    celery --broker redis://HOST:6379/0 status                # the workers that answer

(``amqp://USER:PASSWORD@HOST:5672//`` for RabbitMQ.) Each active task is ``obsflow.run``
with the run's ID as its argument: ``obsflow runs show ID`` says the rest. Workers send
task events only when asked: ``celery --broker URL control enable_events``, then
``celery --broker URL events`` (a terminal monitor), or Flower (``pip install flower``;
``celery --broker URL flower``), which asks for them itself. Messages waiting in a queue:
``redis-cli -n DB llen QUEUE``, or ``rabbitmqctl list_queues name messages_ready
messages_unacknowledged``.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from obsflow.errors import ObsflowError
from obsflow.processing.executor import Executor
from obsflow.processing.plan import queue_of
from obsflow.registry import Registry
from obsflow.settings import Processing, Settings

log = logging.getLogger(__name__)

TASK: Final = "obsflow.run"
"""The one task: execute the run whose ID is its argument."""
PUBLISH_RETRY: Final = {
    "max_retries": 3,
    "interval_start": 0.0,
    "interval_step": 0.5,
    "interval_max": 1.0,
}
"""Publishing a run tries the broker 4 times over about 2 s (plus the connection timeouts),
then gives up: the tracker's pass reports it and the next pass tries again."""
CONNECT_SECONDS: Final = 5.0
"""A broker that does not answer a connection in this long is unreachable for now."""


class BrokerError(ObsflowError):
    """The Celery broker is not configured, or cannot be reached to hand a run over."""


def require_broker(processing: Processing) -> str:
    """The broker's URL; :class:`BrokerError` naming the three ways to set it if none is."""
    if not processing.broker:
        raise BrokerError(
            "no Celery broker: set processing.broker in obsflow.yaml, $OBSFLOW_BROKER, or "
            "--broker (redis://HOST:6379/0 or amqp://USER:PASSWORD@HOST:5672//)"
        )
    return processing.broker


def shown(broker: str) -> str:
    """A broker's URL as logs and messages show it: the password masked."""
    return str(maybe_sanitize_url(broker))


def is_redis(broker: str) -> bool:
    return broker.startswith(("redis://", "rediss://"))


def make_app(processing: Processing) -> Celery:
    """The Celery app of ``processing``'s broker, configured as the module docstring says
    (the executor publishes with it; a worker adds the task and consumes with it)."""
    broker = require_broker(processing)
    app = Celery("obsflow", broker=broker, set_as_current=False)
    if is_redis(broker):
        transport: dict[str, Any] = {
            # see the module docstring: the claim makes a second delivery harmless
            "visibility_timeout": processing.dispatch_seconds,
            "socket_connect_timeout": CONNECT_SECONDS,
            # a publish on a half-open connection must not wait forever; above the
            # consumer's blocking pop (1 s)
            "socket_timeout": 30.0,
        }
    else:
        transport = {"confirm_publish": True}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_store_errors_even_if_ignored=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=CONNECT_SECONDS,
        broker_transport_options=transport,
        task_default_queue=processing.queue,
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # obsflow's logging and streams stay as the command set them up
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


class CeleryExecutor(Executor):
    """Hands run IDs to Celery workers through the broker; nothing runs here.

    :attr:`durable`: the broker keeps what was handed over across the daemon's restarts.
    :attr:`in_flight` is 0: what runs where is the catalog's to say (``obsflow runs``).
    """

    durable = True

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        processing = settings.processing
        self.broker = require_broker(processing)
        self.default_queue = processing.queue
        self.app = make_app(processing)
        self.queues: tuple[str, ...] = (processing.queue,)
        """The queues the registry's runs go to: each needs a worker that consumes it."""
        if registry is not None:
            named = {queue_of(registry, p, processing.queue) for p in registry.pipelines}
            self.queues = tuple(sorted(named | {processing.queue}))
        log.info("runs go to Celery at %s, queues %s", shown(self.broker), ", ".join(self.queues))

    def submit(self, run_id: int, queue: str | None = None) -> None:
        """Publish ``obsflow.run(run_id)`` to ``queue`` (None: ``processing.queue``);
        :class:`BrokerError` naming the broker if it cannot be reached (after
        :data:`PUBLISH_RETRY`)."""
        target = queue or self.default_queue
        try:
            self.app.send_task(
                TASK, args=(run_id,), queue=target, retry=True, retry_policy=PUBLISH_RETRY
            )
        except (OperationalError, OSError) as exc:
            raise BrokerError(
                f"cannot hand run {run_id} to the Celery broker at {shown(self.broker)} "
                f"(queue {target}): {exc}"
            ) from exc

    def close(self, stop: bool = False) -> None:
        """Release the connections to the broker. Runs on workers are not this process's
        to stop: they finish there (or, if their worker stops, are queued again)."""
        self.app.close()

    @property
    def in_flight(self) -> int:
        return 0
