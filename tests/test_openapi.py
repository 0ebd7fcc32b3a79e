"""The published contract: /api/schema/ must be a valid OpenAPI document that names every v1 path."""

import pytest
from django.core.management import call_command
from drf_spectacular.generators import SchemaGenerator

from loyalty.event_services import event_type_create
from loyalty.points import points_adjust
from loyalty.rule_services import earning_rule_create
from rewards.services.catalogue import reward_create


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


def _documented(schema, path, method, status):
    """The schema of a documented JSON response, with a component reference resolved."""
    body = schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body


@pytest.mark.parametrize(
    "path, item",
    [
        ("/api/v1/rewards", "RewardOutput"),
        ("/api/v1/earning-rules", "Rule"),
        ("/api/v1/event-types", "EventType"),
        ("/api/v1/members/{member_number}/activity", "ActivityApiOutput"),
    ],
)
def test_lists_are_documented_as_the_object_they_answer_not_a_bare_array(api, program, member, path, item):
    # given: one row in each list (found by schemathesis: these were documented as arrays; a generated POS client
    # would fail to parse every answer)
    reward_create(program=program, code="coffee", kind="product", points_cost=100, name_en="Coffee")
    earning_rule_create(program=program, code="double", name="Double", benefit="multiplier", value=2)
    event_type_create(program=program, code="review", name="Review", points=50)
    points_adjust(member=member, points=10, reason="seed")
    schema = SchemaGenerator().get_schema(request=None, public=True)
    # when
    body = api.get(path.replace("{member_number}", member.member_number)).json()
    # then
    documented = _documented(schema, path, "get", "200")
    assert documented["type"] == "object"
    assert set(body) == set(documented["properties"]) == set(documented["required"])
    assert documented["properties"]["results"]["items"]["$ref"].endswith(f"/{item}")
    assert set(body["results"][0]) == set(schema["components"]["schemas"][item]["properties"])


@pytest.mark.parametrize("path", ["/api/v1/rewards/{code}", "/api/v1/earning-rules/{code}"])
def test_retiring_is_documented_as_the_200_with_the_retired_resource_it_answers(api, program, path):
    # given (found by schemathesis: documented as a 204 without a body)
    reward_create(program=program, code="gone", kind="product", points_cost=100, name_en="Gone")
    earning_rule_create(program=program, code="gone", name="Gone", benefit="multiplier", value=2)
    schema = SchemaGenerator().get_schema(request=None, public=True)
    # when
    response = api.delete(path.replace("{code}", "gone"))
    # then
    assert response.status_code == 200, response.content
    assert {s for s in schema["paths"][path]["delete"]["responses"] if s.startswith("2")} == {"200"}
    assert set(response.json()) == set(_documented(schema, path, "delete", "200")["properties"])


def test_every_operation_documents_its_problem_responses(db):
    # given
    from drf_spectacular.generators import SchemaGenerator

    # when
    schema = SchemaGenerator().get_schema(request=None, public=True)
    # then
    operations = [op for path, ops in schema["paths"].items() if path.startswith("/api/v1/") for op in ops.values()]
    assert operations
    for operation in operations:
        for status in ("400", "401", "403", "404", "409", "422"):
            content = operation["responses"][status]["content"]
            assert "application/problem+json" in content or "application/json" in content
