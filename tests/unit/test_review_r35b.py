"""Second read of round 35's tracking change: a tracking URL where another web service answers."""

from __future__ import annotations

import http.server
import json

import pytest

from faceage.tracking import TrackingError, mlflow_env, refusal, setup_mlflow
from tests.conftest import http_server


class _JsonNotMlflow(http.server.BaseHTTPRequestHandler):
    """Another web service on the tracking URL's port whose errors are JSON: FastAPI's (a model server, a BentoML
    service's mounted app) ``404 {"detail": "Not Found"}``, or a gateway's ``{"error_code": "UNAUTHENTICATED"}``."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, body = self.server.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def _refused(answer) -> str:
    with http_server(_JsonNotMlflow, answer=answer) as srv:
        with mlflow_env("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{srv.server_port}"):
            with pytest.raises(TrackingError) as e:
                setup_mlflow()
    return str(e.value)


def test_a_json_404_from_another_web_service_is_named_as_not_an_mlflow_server():
    """MLflow reads a JSON error body as an MLflow error (RestException, "INTERNAL_ERROR: Response: {'detail': 'Not
    Found'}") and drops the status, so the one line said "check the server's log" of a server that is not MLflow's,
    where a plain-text 404 is named as not an MLflow tracking server (README: "a 404 for a wrong port or path")."""
    message = _refused((404, {"detail": "Not Found"}))
    assert "not an MLflow tracking server" in message, message
    assert "check the server's log" not in message and "s3cret" not in message and "\n" not in message
    assert "Not Found" in message  # what it answered


def test_a_json_401_names_the_credentials():
    """A gateway or proxy in front of MLflow answering 401 with an MLflow-style JSON error: the line named no
    credential variable (it said "check the server's log")."""
    message = _refused((401, {"error_code": "UNAUTHENTICATED", "message": "Credentials are required."}))
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_TOKEN" in message, message
    assert "check the server's log" not in message


def test_a_real_mlflow_error_still_sends_the_user_to_the_servers_log():
    """An MLflow server's own JSON error (one MLflow does not retry, as it retries a 500): it is an MLflow server, so
    not "not an MLflow server"."""
    message = _refused((400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "the store's schema is too old"}))
    assert "check the server's log" in message and "schema is too old" in message
    assert "not an MLflow tracking server" not in message


def test_a_password_with_an_at_sign_is_masked_whole_in_mlflows_message():
    """MLflow's "API request to <url> failed with exception ..." quotes the URL as given; a password with an ``@``
    (which MLflow and ``display_uri`` accept: the last ``@`` ends it) kept its end in the message."""
    from mlflow.exceptions import MlflowException

    error = MlflowException("API request to http://alice:s3cr@t99@127.0.0.1:5000/api/2.0/mlflow/experiments/"
                            "get-by-name failed with exception HTTPConnectionPool(host='127.0.0.1', port=5000): "
                            "Max retries exceeded (Caused by ResponseError('too many 500 error responses'))")
    message = refusal("http://alice:s3cr@t99@127.0.0.1:5000", error)
    assert "s3cr" not in message and "t99" not in message, message
    assert "http://alice:***@127.0.0.1:5000" in message


class _HtmlPage(http.server.BaseHTTPRequestHandler):
    """A web app that answers every path 200 with its HTML page (a single-page app, a notebook server's login page)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        data = b"<!doctype html><html><body>Welcome</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_html_page_answered_with_200_is_named_as_not_an_mlflow_server():
    """MLflow: "API request to endpoint was successful but the response body was not in a valid JSON format"; the line
    said "check the server's log", of a server that is not MLflow's."""
    with http_server(_HtmlPage) as srv:
        with mlflow_env("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{srv.server_port}"):
            with pytest.raises(TrackingError) as e:
                setup_mlflow()
    message = str(e.value)
    assert "not an MLflow tracking server" in message and "check the server's log" not in message, message


@pytest.mark.parametrize("removal", ["params.yaml:~train.lr", "params.yaml:~train"])
def test_a_removal_with_the_files_name_is_named_as_the_removal(removal, tmp_path):
    """DVC takes ``-S params.yaml:~train.lr`` as ``-S ~train.lr`` (the file's name before a ``:``); check_result looked
    for the ``~`` at the override's start, so the line blamed a params.yaml older than the code and told the user to
    add the key they had just removed."""
    import shutil
    from pathlib import Path

    from faceage.experiment import ProfileError, check_result

    shutil.copyfile(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ProfileError) as e:
        check_result(tmp_path, [removal], typed=[removal])
    message = str(e.value)
    assert message.startswith(f"-S {removal} removes "), message
    assert "older than this code" not in message and "add `" not in message
