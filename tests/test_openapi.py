"""The published contract: /api/schema/ must be a valid OpenAPI document that names every v1 path."""

import pytest
from django.core.management import call_command


def test_the_schema_is_valid_and_generated_without_warnings(tmp_path, db):
    # when: drf-spectacular validates against the OpenAPI 3 meta-schema and fails on any warning
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    # then
    text = target.read_text()
    for path in (
        "/api/v1/transactions:",
        "/api/v1/members/{member_number}/balance:",
        "/api/v1/points/holds:",
        "/api/v1/redemptions:",
        "/api/v1/earning-rules:",
        "/api/v1/tiers:",
        "/api/v1/events:",
    ):
        assert path in text


@pytest.mark.parametrize("url", ["/api/schema/", "/api/docs/"])
def test_the_schema_and_its_docs_are_served(client, url, db):
    # when
    response = client.get(url)
    # then
    assert response.status_code == 200
