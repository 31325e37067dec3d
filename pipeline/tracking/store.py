"""Where runs are recorded: tracking-URI resolution and the reachability check done before any work.

The default store is a SQLite file in the working directory (``<cwd>/mlflow.db``, artifacts in
``<cwd>/mlartifacts``), so ``mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db`` shows every run
without a server. ``tracking.tracking_uri`` in the config, or else ``$MLFLOW_TRACKING_URI``, points at a
tracking server instead.

An unreachable server is detected with one plain HTTP GET and a short timeout (MLflow's own client retries
for minutes): ``tracking.on_unreachable: fail`` (default) raises :class:`TrackingUnavailable` naming the URI
before the stage does any work; ``fallback`` logs a WARNING and records to the local SQLite store.

mlflow is imported lazily (it takes seconds), only by :func:`import_mlflow` and the functions that talk to
the store through a client (:func:`get_or_create_experiment`).
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_DB_NAME = "mlflow.db"
ARTIFACT_DIR_NAME = "mlartifacts"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the message names the (credential-free) URI."""


def redact_uri(uri: str) -> str:
    """``https://user:secret@host/x`` -> ``https://***@host/x`` (for logs and error messages)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def local_store_uri(directory: str | Path | None = None) -> str:
    """``sqlite:///<abs dir>/mlflow.db`` (``directory`` defaults to the working directory)."""
    db = Path(directory or Path.cwd()).absolute() / DEFAULT_DB_NAME
    return f"sqlite:///{db}"


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path | None = None) -> str:
    """The tracking URI to use: ``cfg.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > the local SQLite store.

    The local store and relative SQLite paths are taken relative to ``workdir`` (default: the working
    directory): ``sqlite:///mlflow.db`` is otherwise relative to whichever process opens it, so stages run
    from different directories (or ``dvc exp`` temp dirs) and a notebook run in ``notebooks/`` (which passes
    the folder the stages ran in) would disagree.

    >>> from pipeline.config import TrackingConfig
    >>> resolve_tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:5000"))
    'http://127.0.0.1:5000'
    >>> resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///mlflow.db"), "/runs/a")
    'sqlite:////runs/a/mlflow.db'
    """
    base = Path(workdir) if workdir is not None else Path.cwd()
    uri = (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(base)).strip()
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        uri = f"sqlite:///{(base / db).absolute()}" + (uri[uri.index("?"):] if "?" in uri else "")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_location(uri: str) -> str | None:
    """Artifact root for new experiments: ``<db dir>/mlartifacts`` for a SQLite store, else None.

    Without it MLflow puts a SQLite store's artifacts in ``./mlruns`` of whatever the working directory
    happens to be. For a server (None) the server decides (``mlflow-artifacts:/`` when it proxies them).
    """
    db = sqlite_path(uri)
    return str(db.absolute().parent / ARTIFACT_DIR_NAME) if db is not None else None


def is_http(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def ui_hint(uri: str, experiment_id: str | None, run_id: str | None = None) -> str:
    """Where to look at a run: its URL on a server, or the ``mlflow ui`` command for a SQLite store."""
    if is_http(uri):
        base = redact_uri(uri).rstrip("/")
        return f"{base}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"mlflow ui --backend-store-uri {uri}"


def _ssl_context() -> ssl.SSLContext | None:
    # honour the same TLS settings as MLflow's client, so that the probe and the client agree
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cert) if cert else None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailable` if an http(s) tracking server does not answer within ``timeout_s``.

    One GET of ``<uri>/health`` without retries. Any HTTP answer below 500 counts as reachable (a 401 or
    404 means a server is there; MLflow's client reports what is wrong with it). Other schemes (sqlite,
    databricks, ...) are not probed here; a SQLite store's folder is created if missing.
    """
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.absolute().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {uri}: cannot create its folder ({exc})"
            ) from None
        return
    if not is_http(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        kwargs = {"timeout": timeout_s}
        ctx = _ssl_context()
        if ctx is not None and url.startswith("https"):
            kwargs["context"] = ctx
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), **kwargs):  # noqa: S310
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code} from {redact_uri(url)}"
    except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, DNS, timeout, TLS, bad URL
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    raise TrackingUnavailable(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}; timeout {timeout_s:g} s). "
        "Start it, point tracking.tracking_uri / MLFLOW_TRACKING_URI at a reachable server, or set "
        "tracking.on_unreachable=fallback to record to the local SQLite store."
    )


def select_store(cfg: TrackingConfig, timeout_s: float = 5.0) -> tuple[str, str | None]:
    """Resolve the URI and apply ``cfg.on_unreachable``: returns ``(uri to use, unreachable uri or None)``.

    Raises:
        TrackingUnavailable: the server is unreachable and ``on_unreachable`` is ``fail``.
    """
    uri = resolve_tracking_uri(cfg)
    try:
        check_reachable(uri, timeout_s)
    except TrackingUnavailable as exc:
        if cfg.on_unreachable == "fail":
            raise
        local = local_store_uri()
        if local == uri:
            raise
        log.warning("%s on_unreachable=fallback: recording to the local store %s instead.", exc, local)
        check_reachable(local, timeout_s)
        return local, uri
    return uri, None


def import_mlflow() -> Any:
    """Import mlflow (lazily: it costs seconds) with telemetry off unless the user decided otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """Id of experiment ``name`` in the store of ``client`` (an ``MlflowClient`` for ``uri``), created if new.

    A new experiment of a SQLite store keeps its artifacts in :func:`artifact_location`.

    Raises:
        RuntimeError: the experiment exists but is deleted (MLflow would refuse to log into it).
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"MLflow experiment {name!r} in {redact_uri(uri)} is deleted: restore it "
                "(mlflow experiments restore) or choose another tracking.experiment"
            )
        return str(exp.experiment_id)
    location = artifact_location(uri)
    if location is not None:
        Path(location).mkdir(parents=True, exist_ok=True)
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)
