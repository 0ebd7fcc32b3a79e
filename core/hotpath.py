"""The till's hottest calls served without Django's middleware chain and DRF's dispatch.

Going through nine middlewares, URL resolution, DRF's request wrapping, content negotiation and rendering costs about
1 ms of CPU per request on a 2-core machine, more than the database work of a purchase. For a hot route, its DRF
view's handler is called directly with the API client and the parsed JSON body. Of the middlewares, Idempotency-Key
handling runs as it is (when the header is sent); the work of the others that shows in an answer (the language
activated, the headers added, a request refused) depends on a few request headers and the settings only, so it is
found once per kind of request by running them on a probe and then applied as found (`_Envelope`): running them,
with a Django request and response built for each request, cost more than the rest of a balance read. Only the
plain success case is answered here: a known key
with the scope, a JSON body, a handler that succeeds. Anything else is declined (Decline, or any error) and the
request goes to the full Django stack unchanged, its body given back, so every error, 4xx and 5xx, comes from one
place and reads the same whichever way the request came in. A handler's writes are one statement or one database
transaction, so a declined attempt leaves nothing behind, and its Idempotency-Key claim is given back; the full stack
then runs the request from the start.

The routes are `hot_routes` in config/urls.py; `config/wsgi.py` wraps the Django application in `HotPaths` unless
`HOT_PATHS=false`. The tests' API client goes through them too (tests/clients.py)."""

import io
import logging
import threading
from dataclasses import dataclass
from functools import cache
from http.client import responses
from typing import NamedTuple

from django.conf import settings
from django.core import signals
from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.locale import LocaleMiddleware
from django.middleware.security import SecurityMiddleware
from django.test.signals import setting_changed
from django.urls.resolvers import RoutePattern
from django.utils import translation
from django.utils.cache import patch_vary_headers
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.utils import json as drf_json
from rest_framework.views import APIView

from core.auth import api_client_for_key, raw_key_from_header
from core.db import prepared_statements_kept
from core.errors import ApplicationError
from core.idempotency import HEADER as IDEMPOTENCY_KEY
from core.idempotency import IdempotencyMiddleware
from core.models import ApiClient

logger = logging.getLogger(__name__)

_ACCEPTED = frozenset(["", "*/*", "application/json"])
_JSON_TYPES = frozenset(["application/json", "application/json;charset=utf-8"])
# The middlewares of settings.MIDDLEWARE whose work shows in an API answer, in the same order as in the full stack:
# security headers, Content-Language, ALLOWED_HOSTS and Content-Length; then Idempotency-Key handling around the
# view; then X-Frame-Options. The others do nothing for these requests: no session, user, message or CSRF token is
# used.
_OUTER = (SecurityMiddleware, LocaleMiddleware, CommonMiddleware)
_INNER = (XFrameOptionsMiddleware,)
_ENVELOPES_KEPT = 1024  # kinds of request (hosts, languages, ...); the oldest is forgotten to make room
_renderer = JSONRenderer()


@dataclass(frozen=True)
class HotRoute:
    """`api_view`'s handler of `method` serves `path` (a route as in config/urls.py, from /api/) here, for a key with
    the scope the view asks. The handler must read nothing of its request but `auth` (the API client) and
    `data` (the parsed JSON body), and answer with a DRF Response or `reply`; tests/test_hot_paths.py checks each
    route's answers against the full stack's."""

    method: str
    path: str
    api_view: type[APIView]


@dataclass(frozen=True)
class _ApiRequest:
    """What a hot route's DRF handler reads of its request."""

    auth: ApiClient
    data: object


@dataclass(frozen=True)
class _Envelope:
    """What the middlewares do to every answer of a hot route to requests alike in what they read (`_envelope_keys`):
    the language LocaleMiddleware activates, and the headers they add, those of the middlewares inside
    IdempotencyMiddleware (`inner`) apart, as they do not see the answers it gives itself. Found by running the
    middlewares themselves on such a request with an empty answer (`_envelope_probe`), so they stay the authority.
    They read nothing of a hot route's path: it starts with api/, names no language and needs no trailing slash;
    only SECURE_REDIRECT_EXEMPT could tell paths apart, and with it (and SECURE_SSL_REDIRECT) the probe runs for
    every request. Requests with cookies are left to the full stack (sessions, CSRF and the language cookie)."""

    language: str
    inner: tuple[tuple[str, str], ...]
    outer: tuple[tuple[str, str], ...]


class _Reply(NamedTuple):
    data: object
    status: int


def reply(request, data, *, status: int = 200) -> Response | _Reply:
    """A handler's answer without headers of its own: `Response(data, status=status)` for the full stack; on a hot
    path, the data and status alone, which it renders itself. Making a Response costs ~15 µs, a tenth of a balance
    read's Python."""
    if type(request) is _ApiRequest:
        return _Reply(data, status)
    return Response(data, status=status)


@dataclass(frozen=True)
class Answer:
    """A hot route's HTTP answer."""

    status: int
    headers: list[tuple[str, str]]
    content: bytes

    @classmethod
    def of(cls, response: HttpResponse) -> "Answer":
        return cls(response.status_code, list(response.items()), response.content)

    def as_response(self) -> HttpResponse:
        response = HttpResponse(self.content, status=self.status)
        for name, value in self.headers:
            response[name] = value
        return response

    def with_headers(self, added: tuple[tuple[str, str], ...]) -> "Answer":
        """This answer with the headers a middleware adds, as the middlewares add them: a header the answer already
        has is kept, but for Vary, whose values are merged."""
        have = {name.lower() for name, _ in self.headers}
        if "vary" in have and any(name.lower() == "vary" for name, _ in added):
            response = self.as_response()
            for name, value in added:
                if name.lower() == "vary":
                    patch_vary_headers(response, [v.strip() for v in value.split(",")])
                else:
                    response.headers.setdefault(name, value)
            return Answer.of(response)
        return Answer(self.status, self.headers + [h for h in added if h[0].lower() not in have], self.content)


class _Closing(list):
    """A WSGI body whose close(), which the server calls once it is sent, ends the request as Django's does."""

    def close(self):
        signals.request_finished.send(sender=HotPaths)


class HotPaths:
    """WSGI application: requests matching a hot route are answered here; all others, and those declined, by Django."""

    def __init__(self, django_app, routes: list[HotRoute]):
        self.django_app = django_app
        self.routes = [
            (route, RoutePattern("/" + route.path, is_endpoint=True), _allow_header(route.api_view)) for route in routes
        ]
        order = [f"{m.__module__}.{m.__name__}" for m in (*_OUTER, IdempotencyMiddleware, *_INNER)]
        positions = [settings.MIDDLEWARE.index(name) for name in order if name in settings.MIDDLEWARE]
        assert len(positions) == len(order) and positions == sorted(positions), "hot paths run other middleware"
        self.envelopes: dict[tuple, _Envelope | None] = {}
        self.lock = threading.Lock()
        setting_changed.connect(self._forget_envelopes, weak=False)  # the middlewares read settings (tests change them)

    def __call__(self, environ, start_response):
        route = self.route(environ)
        if route is None:
            return self.django_app(environ, start_response)
        # Django's handler sends these signals around each request; they close connections that are broken or
        # past CONN_MAX_AGE.
        signals.request_started.send(sender=self.__class__, environ=environ)
        answer = self.respond(environ, route)
        if answer is None:
            signals.request_finished.send(sender=self.__class__)
            return self.django_app(environ, start_response)
        start_response(f"{answer.status} {responses.get(answer.status, 'Unknown Status Code')}", answer.headers)
        return _Closing([answer.content])

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

    def respond(self, environ, matched: tuple[HotRoute, str, dict]) -> Answer | None:
        """The hot view's answer, or None when the full stack is to answer; then the body read is given back."""
        route, allow, kwargs = matched
        body = None  # not read yet: a request declined before then keeps its input as it came
        try:
            client = _client(environ, route.api_view.scopes[route.method])
            envelope = self._envelope(environ)
            if envelope is None:
                raise Decline  # a redirect, a host not allowed, a user agent refused, a cookie: the full stack's
            body = _read_body(environ)
            translation.activate(envelope.language)
            data = _json_body(environ, body)

            def view() -> Answer:
                # A refused write is rolled back here, and again on the full stack, which answers it: the connection
                # keeps its prepared statements through both (there, core.db.KeepPreparedStatementsMiddleware).
                with prepared_statements_kept():
                    answer = getattr(route.api_view(), route.method.lower())(_ApiRequest(client, data), **kwargs)
                headers = [("Content-Type", "application/json"), ("Allow", allow)]
                if type(answer) is _Reply:
                    status = answer.status
                else:
                    status = answer.status_code
                    headers += [h for h in answer.items() if h[0] not in ("Content-Type", "Allow")]
                return Answer(status, headers, _renderer.render(answer.data)).with_headers(envelope.inner)

            if IDEMPOTENCY_KEY in environ:
                # A declined view raises through the middleware, which gives the key's claim back for the full stack.
                environ["wsgi.input"] = io.BytesIO(body)
                answer = Answer.of(IdempotencyMiddleware(lambda request: view().as_response())(WSGIRequest(environ)))
            else:
                answer = view()
        except (Decline, ValidationError, ApplicationError):
            answer = None  # the full stack answers with its problem
        except Exception:
            logger.warning("hot path %s %s failed; the full stack takes it", route.method, route.path, exc_info=True)
            answer = None
        if answer is None:
            if body is not None:
                environ["wsgi.input"] = io.BytesIO(body)
            return None
        return answer.with_headers((*envelope.outer, ("Content-Length", str(len(answer.content)))))

    def _envelope(self, environ) -> _Envelope | None:
        """The envelope of this request's answer; None when the middlewares would answer it themselves."""
        if environ.get("HTTP_COOKIE"):
            return None
        facts = {k: environ[k] for k in _envelope_keys() if k in environ}
        if settings.SECURE_SSL_REDIRECT and settings.SECURE_REDIRECT_EXEMPT:
            return _envelope_probe(facts, environ)
        envelopes, key = self.envelopes, tuple(facts.items())  # the dict of now: a settings change replaces it
        try:
            return envelopes[key]
        except KeyError:
            pass
        envelope = _envelope_probe(facts, environ)
        with self.lock:
            if len(envelopes) >= _ENVELOPES_KEPT:
                del envelopes[next(iter(envelopes))]
            envelopes[key] = envelope
        return envelope

    def _forget_envelopes(self, **kwargs) -> None:
        self.envelopes = {}
        _envelope_keys.cache_clear()


@cache
def _envelope_keys() -> tuple[str, ...]:
    """Everything of a request that SecurityMiddleware, LocaleMiddleware, CommonMiddleware and XFrameOptionsMiddleware
    read under the settings, but its path and cookies."""
    keys = ["wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "HTTP_ACCEPT_LANGUAGE"]
    if settings.SECURE_PROXY_SSL_HEADER:
        keys.append(settings.SECURE_PROXY_SSL_HEADER[0])
    if settings.USE_X_FORWARDED_HOST:
        keys.append("HTTP_X_FORWARDED_HOST")
    if settings.USE_X_FORWARDED_PORT:
        keys.append("HTTP_X_FORWARDED_PORT")
    if settings.DISALLOWED_USER_AGENTS:
        keys.append("HTTP_USER_AGENT")
    return tuple(keys)


def _envelope_probe(facts: dict, environ) -> _Envelope | None:
    """Run the middlewares on a request made only of `facts` (and this request's method and path) and an empty
    answer; None if they answer or refuse the request themselves."""
    request = WSGIRequest(
        {
            **facts,
            "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "PATH_INFO": environ.get("PATH_INFO", ""),
            "SCRIPT_NAME": environ.get("SCRIPT_NAME", ""),
            "wsgi.input": io.BytesIO(b""),
        }
    )
    outer, inner = [m(lambda r: None) for m in _OUTER], [m(lambda r: None) for m in _INNER]
    try:
        for middleware in outer:
            if middleware.process_request(request) is not None:
                return None
        language = translation.get_language()
        response = HttpResponse(b"", content_type="application/json")
        before = set(response.headers)
        for middleware in reversed(inner):
            response = middleware.process_response(request, response)
        added_inside = set(response.headers) - before
        for middleware in reversed(outer):
            response = middleware.process_response(request, response)
    except Exception:  # DisallowedHost, PermissionDenied, ...: the full stack answers with its error
        return None
    added = [(name, value) for name, value in response.items() if name not in before and name != "Content-Length"]
    return _Envelope(
        language,
        inner=tuple(h for h in added if h[0] in added_inside),
        outer=tuple(h for h in added if h[0] not in added_inside),
    )


def _allow_header(api_view: type[APIView]) -> str:
    view = api_view()
    view.setup(None)  # as as_view() does: HEAD is served where GET is
    return ", ".join(view.allowed_methods)


class Decline(Exception):
    """The full stack is to answer this request."""


def _read_body(environ) -> bytes:
    """The request's body as Django reads it; declined when Django would refuse it as too large."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if settings.DATA_UPLOAD_MAX_MEMORY_SIZE is not None and length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
        raise Decline
    return environ["wsgi.input"].read(length) if length > 0 else b""


def _client(environ, scope: str) -> ApiClient:
    """The request's API client if it has `scope`; otherwise declined (the full stack answers 401 or 403)."""
    raw = raw_key_from_header(environ.get("HTTP_AUTHORIZATION", ""))
    client = api_client_for_key(raw) if raw else None
    if client is None or not client.has_scope(scope):
        raise Decline
    return client


def _json_body(environ, body: bytes):
    """The request's JSON body as DRF's JSONParser reads it ({} when there is none); declined when it is not JSON."""
    if not environ.get("CONTENT_LENGTH") or environ["CONTENT_LENGTH"] == "0":
        return {}
    if environ.get("CONTENT_TYPE", "").replace(" ", "").lower() not in _JSON_TYPES:
        raise Decline
    try:
        # JSONParser's reading (utf-8, the only charset let through; its strictness on NaN and Infinity) without its
        # stream decoder, which cost more than the parsing.
        return drf_json.loads(
            body.decode("utf-8"), parse_constant=drf_json.strict_constant if api_settings.STRICT_JSON else None
        )
    except ValueError:  # UnicodeDecodeError included
        raise Decline from None
