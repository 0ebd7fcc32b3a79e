"""The suite runs on PostgreSQL and Redis (scripts/test sets DATABASE_URL and REDIS_URL); it refuses to run on the
embedded SQLite default, whose locking would make the concurrency tests meaningless."""

import pytest
from django.conf import settings


def pytest_configure(config):
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine != "django.db.backends.postgresql":
        raise pytest.UsageError(f"The tests need PostgreSQL (DATABASE_URL); got {engine}. Run them with scripts/test.")
    if not settings.REDIS_URL:
        raise pytest.UsageError("The tests need Redis (REDIS_URL). Run them with scripts/test.")


@pytest.fixture
def program(db):
    from core.models import Program

    # A transactional test empties every table afterwards, the migration's DEFAULT programme included.
    return Program.objects.get_or_create(code="DEFAULT", defaults={"name": "Default programme", "currency": "SEK"})[0]


@pytest.fixture
def make_client(program):
    """An API client of the programme with the given scopes (all by default); returns (client, raw key)."""
    from core.models import ApiClient

    def make(*, scopes=None, name=None, for_program=None):
        client = ApiClient(
            program=for_program or program,
            name=name or f"till-{ApiClient.objects.count() + 1}",
            scopes=list(ApiClient.Scope.values) if scopes is None else scopes,
        )
        raw = client.set_new_key()
        client.save()
        return client, raw

    return make


@pytest.fixture
def api(make_client):
    """An API client (tests/clients.py) authenticated with an all-scopes key of the DEFAULT programme."""
    from tests.clients import APIClient

    _, raw = make_client()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    return client


@pytest.fixture
def member(program):
    from tests.factories import MemberFactory

    return MemberFactory(program=program)


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    """Each test starts with empty in-process caches: a rolled-back test's rules, tiers or clients, cached under
    ids the next test reuses, must not leak into it."""
    from core import auth
    from loyalty import rules, tiers

    auth._clients.clear()
    rules._cache.clear()
    rules._spent.clear()
    tiers.tier_cache_clear()
    yield


@pytest.fixture
def prepared_plans(db):
    """(generic, custom): how often PostgreSQL ran the one prepared statement of this connection whose text holds
    all the given fragments with its generic plan, and how often it planned it anew for the values at hand. The
    driver prepares a statement once it has run a few times; PostgreSQL plans it for its values five times, then keeps
    the generic plan unless that looks costlier than the plans for the values, counting what planning costs."""
    from django.db import connection

    def plans(*fragments: str) -> tuple[int, int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
            found = [
                (generic, custom) for text, generic, custom in cursor.fetchall() if all(f in text for f in fragments)
            ]
        assert len(found) == 1, f"{len(found)} prepared statements hold {fragments}"
        return found[0]

    return plans
