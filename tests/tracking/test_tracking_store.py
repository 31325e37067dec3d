"""Tracking-URI resolution and the reachability probe (no mlflow import needed)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import TrackingUnavailable, check_reachable, resolve_tracking_uri
from pipeline.tracking.store import artifact_location, redact_uri, ui_hint


def test_uri_precedence_config_then_env_then_local_sqlite(monkeypatch, tmp_path):
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://tracking.example:5000"
    cfg = TrackingConfig(tracking_uri="http://other:5000")
    assert resolve_tracking_uri(cfg) == "http://other:5000"


def test_relative_sqlite_is_made_absolute(tmp_path):
    cfg = TrackingConfig(tracking_uri="sqlite:///runs/mlflow.db")
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"


def test_relative_sqlite_and_local_store_are_taken_in_workdir(monkeypatch, tmp_path):
    # a notebook runs in notebooks/ but reads the store the stages wrote in the repository root
    assert resolve_tracking_uri(TrackingConfig(), "/runs/a") == "sqlite:////runs/a/mlflow.db"
    cfg = TrackingConfig(tracking_uri="sqlite:///db/m.db?mode=ro")
    assert resolve_tracking_uri(cfg, "/runs/a") == "sqlite:////runs/a/db/m.db?mode=ro"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(TrackingConfig(), "/runs/a") == "sqlite:////runs/a/env.db"
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/env.db"


def test_ui_hint_links_a_server_run_or_names_the_ui_command():
    assert ui_hint("https://u:p@host/", "3", "abc") == "https://***@host/#/experiments/3/runs/abc"
    assert ui_hint("sqlite:////x/mlflow.db", "3") == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"


def test_artifact_location_beside_the_database(tmp_path):
    assert artifact_location(f"sqlite:///{tmp_path}/a/mlflow.db") == str(tmp_path / "a" / "mlartifacts")
    assert artifact_location("http://127.0.0.1:5000") is None


def test_redact_uri_hides_credentials():
    assert redact_uri("https://user:secret@host:8443/x") == "https://***@host:8443/x"
    assert redact_uri("http://host:5000") == "http://host:5000"


def test_closed_port_is_unreachable_fast(closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=uri):
        check_reachable(uri, timeout_s=2)
    assert time.monotonic() - t0 < 5


def _serve(status: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (401, True), (404, True), (503, False)])
def test_http_status_decides_reachability(status, reachable):
    server = _serve(status)
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if reachable:
            check_reachable(uri, timeout_s=5)
        else:
            with pytest.raises(TrackingUnavailable, match="HTTP 503"):
                check_reachable(uri, timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()


def test_sqlite_folder_is_created(tmp_path):
    check_reachable(f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    assert (tmp_path / "new" / "dir").is_dir()
