"""One exception tree for errors a client can act on, and one handler that answers them as
`application/problem+json` (RFC 9457) with a stable machine-readable `code`."""

import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.views import set_rollback

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ApplicationError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str = "", *, code: str | None = None, errors: dict | None = None, **extra):
        super().__init__(detail or self.title)
        if code:
            self.code = code
        self.detail = detail or self.title
        self.errors = errors
        self.extra = extra


class InvalidInput(ApplicationError):
    status, code, title = 400, "invalid", "The request is not valid"


class NotFound(ApplicationError):
    status, code, title = 404, "not_found", "Not found"


class MemberNotFound(NotFound):
    code, title = "member_not_found", "No such member"


class Unprocessable(ApplicationError):
    status, code, title = 422, "unprocessable", "The request cannot be carried out"


class Conflict(ApplicationError):
    status, code, title = 409, "conflict", "Conflict"


class MemberExists(Conflict):
    code, title = "member_exists", "A member with this identifier already exists"


class InsufficientPoints(Conflict):
    code, title = "insufficient_points", "Not enough points available"


class MemberNotActive(Conflict):
    code, title = "member_not_active", "The member is not active"


class IdempotencyKeyReused(ApplicationError):
    status, code, title = 422, "idempotency_key_reused", "Idempotency key was used with another request"


class IdempotencyInProgress(Conflict):
    code, title = "idempotency_in_progress", "A request with this idempotency key is still running"


def problem(*, status: int, code: str, title: str, detail: str, errors: dict | None = None, **extra) -> dict:
    body = {"type": f"urn:loyalty:problem:{code}", "title": title, "status": status, "detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    body.update(extra)
    return body


def problem_response(status: int, code: str, title: str, detail: str, **kw) -> JsonResponse:
    """A plain Django response, for answers given outside DRF (middleware, URL-level 404/500)."""
    return JsonResponse(
        problem(status=status, code=code, title=title, detail=detail, **kw),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
    )


def _flatten(errors) -> dict:
    """DRF's nested error structure as field path → list of messages."""
    out: dict[str, list[str]] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, int):  # DRF reports list items by index
                    walk(f"{prefix}[{k}]", v)
                else:
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            for i, v in enumerate(value):
                if v:
                    walk(f"{prefix}[{i}]" if prefix else str(i), v)
        else:
            messages = value if isinstance(value, list) else [value]
            out.setdefault(prefix or "non_field_errors", []).extend(str(m) for m in messages)

    walk("", errors)
    return out


_DRF_CODES = {
    drf.ParseError: ("malformed_request", "The request body could not be parsed"),
    drf.AuthenticationFailed: ("not_authenticated", "Authentication failed"),
    drf.NotAuthenticated: ("not_authenticated", "Authentication required"),
    drf.PermissionDenied: ("permission_denied", "Permission denied"),
    drf.NotFound: ("not_found", "Not found"),
    drf.MethodNotAllowed: ("method_not_allowed", "Method not allowed"),
    drf.NotAcceptable: ("not_acceptable", "Not acceptable"),
    drf.UnsupportedMediaType: ("unsupported_media_type", "Unsupported media type"),
    drf.Throttled: ("rate_limited", "Too many requests"),
}


def problem_for(exc) -> tuple[int, dict, dict] | None:
    """(status, problem document, headers) for an error a client can act on; None for a bug."""
    if isinstance(exc, Http404):
        exc = NotFound(str(exc) if str(exc) else "Not found")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()

    headers = {}
    if isinstance(exc, ApplicationError):
        body = problem(
            status=exc.status, code=exc.code, title=exc.title, detail=exc.detail, errors=exc.errors, **exc.extra
        )
        return exc.status, body, headers
    if isinstance(exc, drf.ValidationError):
        errors = _flatten(exc.detail)
        detail = "; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items())
        body = problem(
            status=400, code="validation_error", title="The request is not valid", detail=detail, errors=errors
        )
        return 400, body, headers
    if isinstance(exc, drf.APIException):
        code, title = next(((c, t) for cls, (c, t) in _DRF_CODES.items() if isinstance(exc, cls)), ("error", "Error"))
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        return exc.status_code, problem(status=exc.status_code, code=code, title=title, detail=str(detail)), headers
    return None


def problem_exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error a view raises becomes a problem document."""
    found = problem_for(exc)
    if found is None:
        return None  # a bug: Django logs it and answers 500 through handler500
    status, body, headers = found
    # A view that wrote before failing must not leave anything behind.
    set_rollback()
    return Response(body, status=status, headers=headers, content_type=PROBLEM_CONTENT_TYPE)


def handler404(request, exception=None):
    return problem_response(404, "not_found", "Not found", f"No resource at {request.path}.")


# What an unexpected error is told as: a request's (handler500) and a batch item's.
SERVER_ERROR = {
    "code": "server_error",
    "title": "Server error",
    "detail": "An unexpected error occurred; it has been logged.",
}


def handler500(request):
    return problem_response(500, **SERVER_ERROR)


def handler400(request, exception=None):
    if isinstance(exception, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return problem_response(
            413, "request_too_large", "Request too large", f"The body is over this service's limit of {limit} bytes."
        )
    return problem_response(400, "bad_request", "Bad request", "The request could not be understood.")
