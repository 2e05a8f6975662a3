"""Logging into one MLflow run without stopping for a tracking outage.

Training and sweep trials log every epoch. When the tracking server is down, a plain
``MlflowClient.log_batch`` either raises (and, unguarded, kills the run) or retries for minutes
inside MLflow's HTTP client. A :class:`RunLogger` instead tries once with MLflow's retries
bounded (:func:`bound_request_retries`), keeps what could not be sent, and sends it with the
next call once the server answers again. With a *spool* location it also writes what is still
pending into run storage after each failed attempt, so that a process that dies during an
outage loses nothing: :func:`flush_spools` sends those files later (the driver does it after
training). What cannot be sent before :meth:`RunLogger.close`'s grace period ends stays in the
spool and is reported with its count and location, never dropped silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mvtcae import storage
from mvtcae.model.errors import UserError
from mvtcae.safety.redaction import redact_text, split_credentials

logger = logging.getLogger(__name__)

T = TypeVar("T")
# MLflow's own HTTP retries default to minutes of exponential back-off per request; during an
# outage every epoch would stall that long. These bound one attempt to a few seconds.
REQUEST_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
METRICS_PER_BATCH = 1000
SPOOL_DIR = "unsent_tracking"


def bound_request_retries() -> None:
    """Bound MLflow's per-request HTTP retries in this process (values a user set are kept)."""
    for key, value in REQUEST_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def client_uri(tracking_uri: str) -> str:
    """The URI to hand to MLflow: credentials written into it move to MLflow's environment
    variables, so that MLflow never prints or stores them (it echoes its host in run links)."""
    public, user, password = split_credentials(tracking_uri)
    if password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return public


def mlflow_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (tracking and registry), credentials kept out of
    the URI."""
    from mlflow import MlflowClient

    uri = client_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def retry_until(call: Callable[[], T], what: str, grace_s: float, interval_s: float = 2.0) -> T:
    """``call()``, retried on any exception until ``grace_s`` has passed; then the last error
    is raised as a ``TrackingUnavailableError`` saying what could not be done. A `UserError`
    is raised at once."""
    deadline = time.monotonic() + grace_s
    warned = False
    while True:
        try:
            return call()
        except UserError:
            raise  # what the user gave is wrong: no outage, and another try gives the same answer
        except Exception as err:  # noqa: BLE001 - any failure of the tracking call is retried
            if time.monotonic() + interval_s > deadline:
                raise TrackingUnavailableError(
                    f"{what}: MLflow did not answer for {grace_s:.0f} s "
                    f"({type(err).__name__}: {redact_text(str(err))[:300]})"
                ) from err
            if not warned:
                logger.warning(
                    "%s failed (%s); retrying for up to %.0f s", what, type(err).__name__, grace_s
                )
                warned = True
            time.sleep(interval_s)
            interval_s = min(interval_s * 2, 30.0)


class TrackingUnavailableError(ConnectionError):
    """MLflow could not be reached within the configured grace period."""


@dataclass
class _Pending:
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.metrics) + len(self.tags)

    def to_json(self) -> str:
        return json.dumps({"metrics": self.metrics, "tags": self.tags})


class RunLogger:
    """Sends metrics and tags to one MLflow run; keeps them through tracking outages.

    Every call tries to send everything pending, at most once per ``retry_interval_s`` while
    the server is unreachable, and never raises for a tracking failure.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        spool: str | None = None,
        retry_interval_s: float = 5.0,
        max_pending: int = 500_000,
    ) -> None:
        bound_request_retries()
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_file = (
            None if spool is None else storage.join(spool, f"{run_id}-{uuid.uuid4().hex[:8]}.json")
        )
        self.retry_interval_s = retry_interval_s
        self.max_pending = max_pending
        self.pending = _Pending()
        self.dropped = 0
        self._down_since: float | None = None
        self._last_attempt = -math.inf
        self._spooled = False

    # -- what callers use ----------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue finite metrics for ``step`` and try to send; non-finite ones become a tag."""
        now = int(time.time() * 1000)
        bad = []
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                self.pending.metrics.append((key, value, now, int(step)))
            else:
                bad.append(f"{key}={value}")
        if bad:
            self.pending.tags[f"mvtcae.nonfinite.step_{step}"] = ", ".join(bad)[:5000]
        self._trim()
        self.flush()

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Log PNG files as MLflow images ``images/<name>`` at ``step``. Images are not kept
        through an outage: one that cannot be sent is named in a warning, never an error."""
        from PIL import Image

        for name, path in images.items():
            try:
                with Image.open(path) as image:
                    mlflow_client(self.tracking_uri).log_image(
                        self.run_id, image.convert("RGB"), key=f"images/{name}", step=int(step)
                    )
            except Exception as err:  # noqa: BLE001 - a picture must not stop training
                logger.warning("image %s of step %d not logged: %s", name, step, err)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which ``key`` is in the run already (empty when the server cannot say:
        then nothing is taken as logged)."""
        try:
            history = mlflow_client(self.tracking_uri).get_metric_history(self.run_id, key)
        except Exception as err:  # noqa: BLE001 - an outage must not stop training
            logger.warning(
                "could not read %s of run %s from %s (%s: %s)",
                key,
                self.run_id,
                redact_text(self.tracking_uri),
                type(err).__name__,
                redact_text(str(err))[:200],
            )
            return set()
        return {int(m.step) for m in history}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags and try to send."""
        self.pending.tags.update({k: str(v)[:5000] for k, v in tags.items()})
        self.flush()

    def flush(self, *, force: bool = False) -> bool:
        """Try to send everything pending; True when nothing is left."""
        if not len(self.pending):
            return True
        waiting = time.monotonic() - self._last_attempt < self.retry_interval_s
        if not force and self._down_since is not None and waiting:
            # Down a moment ago: do not stall this call on another attempt, but keep the spool
            # current, in case this process ends before the server is back.
            self._write_spool()
            return False
        self._last_attempt = time.monotonic()
        try:
            send(self.tracking_uri, self.run_id, self.pending)
        except Exception as err:  # noqa: BLE001 - an outage must not stop training
            self._went_down(err)
            return False
        self._came_back()
        return True

    def close(self, grace_s: float) -> int:
        """Keep trying for up to ``grace_s``; return how many items are still unsent (then left
        in the spool file, whose location is logged)."""
        deadline = time.monotonic() + grace_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(self.retry_interval_s, max(0.0, deadline - time.monotonic())))
        left = len(self.pending)
        if left:
            where = self.spool_file or "nowhere (no spool location)"
            logger.warning(
                "MLflow at %s is unreachable: %d metric values/tags of run %s were not sent; "
                "they are kept in %s and sent by the next flush",
                redact_text(self.tracking_uri),
                left,
                self.run_id,
                where,
            )
        return left

    # -- internals -------------------------------------------------------------------------
    def _trim(self) -> None:
        excess = len(self.pending.metrics) - self.max_pending
        if excess > 0:  # bounded memory in a very long outage: the oldest values go first
            del self.pending.metrics[:excess]
            self.dropped += excess
            logger.warning("MLflow outage: dropped the %d oldest unsent metric values", excess)

    def _went_down(self, err: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "MLflow at %s unreachable (%s: %s); keeping metrics until it answers",
                redact_text(self.tracking_uri),
                type(err).__name__,
                redact_text(str(err))[:200],
            )
        self._write_spool()

    def _came_back(self) -> None:
        if self._down_since is not None:
            logger.warning(
                "MLflow answers again after %.0f s; unsent metrics delivered",
                time.monotonic() - self._down_since,
            )
        self._down_since = None
        self.pending = _Pending()
        if self._spooled and self.spool_file is not None:
            _delete(self.spool_file)
            self._spooled = False

    def _write_spool(self) -> None:
        if self.spool_file is None:
            return
        try:
            storage.write_text(self.spool_file, self.pending.to_json())
            self._spooled = True
        except Exception as err:  # noqa: BLE001 - the in-memory copy is still there
            logger.warning("could not write unsent metrics to %s: %s", self.spool_file, err)


def send(tracking_uri: str, run_id: str, pending: _Pending) -> None:
    """Send pending metrics and tags in batches MLflow accepts (raises on failure)."""
    from mlflow.entities import Metric, RunTag

    metrics = [Metric(k, v, ts, step) for k, v, ts, step in pending.metrics]
    tags = [RunTag(k, v) for k, v in pending.tags.items()]
    log_in_batches(mlflow_client(tracking_uri), run_id, metrics, tags)


def log_in_batches(client: Any, run_id: str, metrics: list[Any], tags: Sequence[Any] = ()) -> None:
    """The one way the platform writes metrics: ``log_batch`` calls of at most
    ``METRICS_PER_BATCH`` metrics (MLflow's limit), the tags with the first (raises on failure)."""
    for start in range(0, max(len(metrics), 1), METRICS_PER_BATCH):
        chunk = metrics[start : start + METRICS_PER_BATCH]
        if chunk or (tags and start == 0):
            client.log_batch(
                run_id, metrics=chunk, tags=list(tags) if start == 0 else [], synchronous=True
            )


def flush_spools(location: str, tracking_uri: str, grace_s: float) -> int:
    """Send every spool file under ``location`` (written by RunLoggers that could not reach
    MLflow) and delete the sent ones; return how many items are still unsent."""
    left = 0
    for name in _spool_files(location):
        path = storage.join(location, name)
        raw = json.loads(storage.read_text(path))
        run_id = name.rsplit("-", 1)[0]
        pending = _Pending(metrics=[tuple(m) for m in raw["metrics"]], tags=raw["tags"])
        try:
            retry_until(
                lambda p=pending, r=run_id: send(tracking_uri, r, p),
                f"sending unsent metrics of run {run_id}",
                grace_s,
            )
        except TrackingUnavailableError as err:
            logger.warning("%s; they stay in %s", err, path)
            left += len(pending)
            continue
        _delete(path)
    return left


def _spool_files(location: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")
    )


def _delete(location: str) -> None:
    fs, path = storage.resolve(location)
    with contextlib.suppress(OSError):  # already gone
        fs.delete_file(path)
