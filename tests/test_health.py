"""/health: what a load balancer and an operator ask before sending traffic."""

import json
import socket

import pytest
from django.test import override_settings


def _closed_port() -> int:
    """A local port nothing listens on: bound, then released, so connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db
def test_health_reports_database_and_redis_ok(client):
    # when
    response = client.get("/health")
    # then
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


@pytest.mark.django_db
def test_health_is_503_when_redis_is_unreachable(client):
    # given Redis pointed at a port where nothing listens
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0"):
        # when
        response = client.get("/health")
    # then the service says it is not ready, and which dependency failed
    assert response.status_code == 503
    body = json.loads(response.content)
    assert body["status"] == "error"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("error: ")
    assert "ConnectionError" in body["checks"]["redis"]


@pytest.mark.django_db
def test_health_answers_only_get(client):
    # when
    response = client.post("/health")
    # then
    assert response.status_code == 405
