"""API clients authenticate with `Authorization: Api-Key <key>`; views name the scope each method needs."""

import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from core.models import ApiClient

# key → (client, fetched at), for known keys only. Remembering clients for a few seconds saves a query on every
# request, and the key's hash too (3 µs); a revoked key keeps working for at most API_CLIENT_CACHE_SECONDS in each
# process. Only the database must not hold keys; this process reads each one in its request anyway.
_clients: dict[str, tuple[ApiClient, float]] = {}
LAST_USED_RESOLUTION = timedelta(minutes=1)


def api_client_for_key(raw_key: str) -> ApiClient | None:
    """The active client whose key this is, with its programme loaded; None if unknown or revoked."""
    now = time.monotonic()
    cached = _clients.get(raw_key)
    if cached and now - cached[1] < settings.API_CLIENT_CACHE_SECONDS:
        return cached[0]
    client = (
        ApiClient.objects.select_related("program")
        .filter(key_hash=ApiClient.hash_key(raw_key), revoked_at__isnull=True)
        .first()
    )
    if client is None:
        _clients.pop(raw_key, None)
        return None
    _touch(client)
    if len(_clients) > 10_000:
        _clients.clear()
    _clients[raw_key] = (client, now)
    return client


def _touch(client: ApiClient) -> None:
    # Compare-and-set, at most once a minute per client: no write on the hot path, no lost update between workers.
    now = timezone.now()
    if client.last_used_at is None or now - client.last_used_at >= LAST_USED_RESOLUTION:
        ApiClient.objects.filter(pk=client.pk, last_used_at=client.last_used_at).update(last_used_at=now)
        client.last_used_at = now


def raw_key_from_header(header: str) -> str | None:
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "api-key" or not key.strip():
        return None
    return key.strip()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Api-Key"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        raw = raw_key_from_header(header)
        if raw is None:
            raise exceptions.AuthenticationFailed("Use the header 'Authorization: Api-Key <key>'.")
        client = api_client_for_key(raw)
        if client is None:
            raise exceptions.AuthenticationFailed("The API key is unknown or revoked.")
        return client, client

    def authenticate_header(self, request):
        return self.keyword


class HasScopes(permissions.BasePermission):
    """The view's `scopes` maps each HTTP method it serves to the scope that method needs."""

    message = "This API key lacks the scope this request needs."

    def has_permission(self, request, view) -> bool:
        client = request.auth
        if not isinstance(client, ApiClient):
            return False
        scopes = getattr(view, "scopes", None)
        if scopes is None:
            return True
        method = "GET" if request.method in ("HEAD", "OPTIONS") else request.method
        if method not in scopes:
            # A method the view does not serve gets DRF's 405, not a misleading 403; one it serves without a
            # declared scope is refused.
            return not hasattr(view, request.method.lower())
        needed = scopes[method]  # None: any key of the programme may
        if needed is not None and not client.has_scope(needed):
            self.message = f"This API key lacks the scope '{needed}'."
            return False
        return True
