"""The till's hottest calls served without Django's middleware chain and DRF's dispatch.

Going through nine middlewares, URL resolution, DRF's request wrapping, content negotiation and rendering costs about
1 ms of CPU per request on a 2-core machine, more than the database work of a purchase. For a hot route, its DRF
view's handler is called directly with the API client and the parsed JSON body, inside the middlewares whose work
shows in the answer (Idempotency-Key handling among them). Only the plain success case is answered here: a known key
with the scope, a JSON body, a handler that succeeds. Anything else is declined (Decline, or any error) and the
request goes to the full Django stack unchanged, its body given back, so every error, 4xx and 5xx, comes from one
place and reads the same whichever way the request came in. A handler's writes are one statement or one database
transaction, so a declined attempt leaves nothing behind, and its Idempotency-Key claim is given back; the full stack
then runs the request from the start.

The routes are `hot_routes` in config/urls.py; `config/wsgi.py` wraps the Django application in `HotPaths` unless
`HOT_PATHS=false`. The tests' API client goes through them too (tests/clients.py)."""

import io
import logging
from dataclasses import dataclass

from django.conf import settings
from django.core import signals
from django.core.exceptions import DisallowedHost
from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.locale import LocaleMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls.resolvers import RoutePattern
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from core.auth import api_client_for_key, raw_key_from_header
from core.errors import ApplicationError
from core.idempotency import IdempotencyMiddleware
from core.models import ApiClient

logger = logging.getLogger(__name__)

_ACCEPTED = frozenset(["", "*/*", "application/json"])
_JSON_TYPES = frozenset(["application/json", "application/json;charset=utf-8"])
# The middlewares of settings.MIDDLEWARE whose work shows in an API answer, run here in the same order as in the full
# stack: security headers, Content-Language, ALLOWED_HOSTS and Content-Length; then Idempotency-Key handling around
# the view; then X-Frame-Options. The others do nothing for these requests: no session, user, message or CSRF token
# is used.
_OUTER = (SecurityMiddleware, LocaleMiddleware, CommonMiddleware)
_INNER = (XFrameOptionsMiddleware,)
_parser, _renderer = JSONParser(), JSONRenderer()


@dataclass(frozen=True)
class HotRoute:
    """`api_view`'s handler of `method` serves `path` (a route as in config/urls.py, from /api/) here, for a key with
    the scope the view asks. The handler must read nothing of its request but `auth` (the API client) and
    `data` (the parsed JSON body), and answer with a DRF Response; tests/test_hot_paths.py checks each route's
    answers against the full stack's."""

    method: str
    path: str
    api_view: type[APIView]


@dataclass(frozen=True)
class _ApiRequest:
    """What a hot route's DRF handler reads of its request."""

    auth: ApiClient
    data: object


class HotPaths:
    """WSGI application: requests matching a hot route are answered here; all others, and those declined, by Django."""

    def __init__(self, django_app, routes: list[HotRoute]):
        self.django_app = django_app
        self.routes = [
            (route, RoutePattern("/" + route.path, is_endpoint=True), _allow_header(route.api_view)) for route in routes
        ]
        self.outer = [m(lambda r: None) for m in _OUTER]
        self.inner = [m(lambda r: None) for m in _INNER]
        order = [f"{m.__module__}.{m.__name__}" for m in (*_OUTER, IdempotencyMiddleware, *_INNER)]
        positions = [settings.MIDDLEWARE.index(name) for name in order if name in settings.MIDDLEWARE]
        assert len(positions) == len(order) and positions == sorted(positions), "hot paths run other middleware"

    def __call__(self, environ, start_response):
        route = self.route(environ)
        if route is None:
            return self.django_app(environ, start_response)
        # Django's handler sends these signals around each request; they close connections that are broken or
        # past CONN_MAX_AGE.
        signals.request_started.send(sender=self.__class__, environ=environ)
        response = self.respond(environ, route)
        if response is None:
            signals.request_finished.send(sender=self.__class__)
            return self.django_app(environ, start_response)
        start_response(f"{response.status_code} {response.reason_phrase}", list(response.items()))
        return response  # the server calls close(), which sends request_finished

    def route(self, environ) -> tuple[HotRoute, str, dict] | None:
        """The hot route for this request, its Allow header and its path's arguments; None if there is none."""
        if environ.get("HTTP_ACCEPT", "").strip() not in _ACCEPTED:
            return None
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        for route, pattern, allow in self.routes:
            match = pattern.match(path) if route.method == method else None
            if match is not None:
                return route, allow, match[2]
        return None

    def respond(self, environ, matched: tuple[HotRoute, str, dict]) -> HttpResponse | None:
        """The hot view's response, or None when the full stack is to answer; then the body it read is given back."""
        route, allow, kwargs = matched
        request = WSGIRequest(environ)

        def view(request) -> HttpResponse:
            client = _client(request, route.api_view.scopes[route.method])
            handler = getattr(route.api_view(), route.method.lower())
            answer = handler(_ApiRequest(client, _json_body(request)), **kwargs)
            response = HttpResponse(_renderer.render(answer.data), status=answer.status_code, headers=answer.headers)
            response["Content-Type"], response["Allow"] = "application/json", allow
            for middleware in reversed(self.inner):
                response = middleware.process_response(request, response)
            return response

        try:
            for middleware in self.outer:
                if middleware.process_request(request) is not None:
                    raise Decline  # a redirect to HTTPS or to a trailing slash: the full stack's to give
            # A declined view raises through it, which gives the key's claim back for the full stack to take.
            response = IdempotencyMiddleware(view)(request)
        except (Decline, DisallowedHost, ValidationError, ApplicationError):
            response = None  # the full stack answers with its problem
        except Exception:
            logger.warning("hot path %s %s failed; the full stack takes it", route.method, route.path, exc_info=True)
            response = None
        if response is None:
            if request._read_started:
                environ["wsgi.input"] = io.BytesIO(request.body)
            return None
        for middleware in reversed(self.outer):
            response = middleware.process_response(request, response)
        response.wsgi_request = request  # as Django's test client handler does, for tests
        return response


def _allow_header(api_view: type[APIView]) -> str:
    view = api_view()
    view.setup(None)  # as as_view() does: HEAD is served where GET is
    return ", ".join(view.allowed_methods)


class Decline(Exception):
    """The full stack is to answer this request."""


def _client(request: WSGIRequest, scope: str) -> ApiClient:
    """The request's API client if it has `scope`; otherwise declined (the full stack answers 401 or 403)."""
    raw = raw_key_from_header(request.META.get("HTTP_AUTHORIZATION", ""))
    client = api_client_for_key(raw) if raw else None
    if client is None or not client.has_scope(scope):
        raise Decline
    return client


def _json_body(request: WSGIRequest):
    """The request's JSON body as DRF's JSONParser reads it ({} when there is none); declined when it is not JSON."""
    if not request.META.get("CONTENT_LENGTH") or request.META["CONTENT_LENGTH"] == "0":
        return {}
    if request.META.get("CONTENT_TYPE", "").replace(" ", "").lower() not in _JSON_TYPES:
        raise Decline
    try:
        return _parser.parse(io.BytesIO(request.body))
    except ParseError:
        raise Decline from None
