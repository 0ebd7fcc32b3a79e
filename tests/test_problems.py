"""However a request is malformed, the answer is a problem document, never a 500 or an HTML page."""

import pytest

URL = "/api/v1/members"


def assert_problem(response, status: int, code: str):
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)
    assert body["type"] == f"urn:loyalty:problem:{code}"
    assert body["title"] and body["detail"]


@pytest.mark.parametrize("raw", ['{"email": ', "not json", '{"email": "a@example.com"}}', "\x00\xff"])
def test_malformed_json_is_a_400_problem_and_writes_nothing(api, raw):
    # when
    response = api.post(URL, raw, content_type="application/json")
    # then
    assert_problem(response, 400, "malformed_request")
    from members.models import Member

    assert not Member.objects.exists()


def test_a_body_in_another_media_type_is_a_415_problem(api):
    # when
    response = api.post(URL, "email=a@example.com", content_type="application/x-www-form-urlencoded")
    # then
    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/members/1234567890/nope", "/api/v2/members"])
def test_an_unknown_api_path_is_a_404_problem(api, path):
    # when
    response = api.get(path)
    # then
    assert_problem(response, 404, "not_found")


def test_an_unknown_api_path_is_a_404_problem_even_without_a_key(db, client):
    # when
    response = client.get("/api/v1/nope")
    # then
    assert_problem(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("delete", URL), ("get", URL), ("put", URL + "/1234567890"), ("post", URL + "/lookup")],
)
def test_a_method_the_endpoint_does_not_serve_is_a_405_problem(api, method, path):
    # when
    response = getattr(api, method)(path)
    # then
    assert_problem(response, 405, "method_not_allowed")


def test_a_validation_error_lists_each_field(api):
    # when
    response = api.post(URL, {"birth_date": "yesterday", "locale": "xx"}, format="json")
    # then
    assert_problem(response, 400, "validation_error")
    assert set(response.json()["errors"]) == {"birth_date", "locale"}
