"""BentoML's own 429 (``traffic.max_concurrency``) over real HTTP, CORS off: it carries ``Retry-After``, so a client
that honours the header waits before its retry instead of retrying at once.

The session's bento is served again with room for one request at a time (``BENTOML_CONFIG_OVERRIDES``, as in
test_cors_r34) and without ``FACEAGE_CORS_ORIGINS``; one upload that never finishes holds the only slot.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from faceage.http import BUSY_RETRY_AFTER_S
from tests.integration.test_cors_r33 import cors_headers
from tests.integration.test_cors_r34 import busy, hold_the_only_slot, one_slot_server, raw_answer

pytestmark = pytest.mark.integration

TIMEOUT_S = 8  # the held upload's 504: long enough for the checks below, a client's retries included


@pytest.fixture(scope="module")
def one_slot_url(bento_server, tmp_path_factory):
    """One slot, CORS off."""
    with one_slot_server(bento_server, tmp_path_factory, "retry-after", TIMEOUT_S, FACEAGE_CORS_ORIGINS=None) as url:
        yield url


def test_a_busy_servers_429_carries_retry_after_and_a_client_waits_by_it(one_slot_url):
    held = hold_the_only_slot(one_slot_url, "http://localhost:3000")
    try:
        r = busy(one_slot_url + "/model_card", method="GET")
        assert r.status_code == 429, f"the held upload did not take the only slot: {r.status_code} {r.text[:200]}"
        assert r.headers.get("Retry-After") == str(BUSY_RETRY_AFTER_S), r.headers
        assert r.json() == {"error": "Too many requests"}  # BentoML's body, the service's {"error": ...} shape
        assert r.headers["content-type"] == "application/json"
        assert cors_headers(r) == {} and "vary" not in r.headers  # CORS off: nothing else added
        r = requests.post(one_slot_url + "/predict", files={"image": ("a.jpg", b"x", "image/jpeg")}, timeout=30)
        assert r.status_code == 429 and r.headers.get("Retry-After") == str(BUSY_RETRY_AFTER_S), r.headers

        # A client that honours the header (urllib3's default Retry does): two retries, each after Retry-After.
        # Without the header, backoff_factor=0 retried at once: the three tries took milliseconds.
        with requests.Session() as client:
            client.mount("http://", HTTPAdapter(max_retries=Retry(
                total=2, status_forcelist=[429], backoff_factor=0, respect_retry_after_header=True,
                raise_on_status=False)))
            started = time.monotonic()
            r = client.get(one_slot_url + "/model_card", timeout=30)
            waited = time.monotonic() - started
        assert r.status_code == 429, r.status_code  # still held: the last try's answer
        assert waited >= 2 * BUSY_RETRY_AFTER_S - 0.1, f"retried after {waited:.2f} s, not by Retry-After"

        # The held upload's 504 (traffic.timeout) is BentoML's, untouched.
        status, headers, body = raw_answer(held)
        assert status == 504 and "retry-after" not in headers, (status, headers, body)
        assert f"in {TIMEOUT_S}" in json.loads(body)["error"]
    finally:
        held.close()
    r = requests.get(one_slot_url + "/model_card", timeout=30)  # free again: an ordinary answer, no Retry-After
    assert r.status_code in (200, 404) and "Retry-After" not in r.headers
