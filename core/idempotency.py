"""`Idempotency-Key` on every POST under /api/: the same key with the same request replays the first response; with
another request it is a 422; while the first is still running, a 409.

The claim is committed on its own before the view runs, so a concurrent repeat sees it at once. A successful
response is stored in the same database transaction as the view's writes, so the work and its record commit or
vanish together. A 4xx is stored after the view's transaction rolled back; a 5xx releases the claim so the client
may retry.

A view whose every write is idempotent on its own and commits on its own (`idempotent_per_item = True`: the batch
of transactions, each item idempotent by its store and external id) runs outside that transaction, and its
response is stored after it. Held in one transaction, a batch would keep every row its items locked until its last
item, and two batches naming the same members in other orders would deadlock. A batch cut off half way (the worker
died) leaves its claim to be taken over, and the repeat answers the items already recorded as repeats (200)."""

import hashlib
import logging
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.http import HttpResponse
from django.urls import Resolver404, resolve
from django.utils import timezone

from core.auth import api_client_for_key, raw_key_from_header
from core.errors import IdempotencyInProgress, IdempotencyKeyReused, problem_response
from core.models import IdempotencyRecord

logger = logging.getLogger(__name__)

HEADER = "HTTP_IDEMPOTENCY_KEY"
# A claim older than this whose request never finished (the worker died) may be taken over.
ABANDONED_AFTER = timedelta(minutes=2)


def _request_hash(request) -> str:
    digest = hashlib.sha256()
    digest.update(request.method.encode())
    digest.update(request.path.encode())
    digest.update(b"\0")
    digest.update(request.body)
    return digest.hexdigest()


def _claim(client, key: str, request_hash: str) -> IdempotencyRecord | HttpResponse:
    """Our claim on the key, or the response to give instead of running the request."""
    now = timezone.now()
    try:
        with transaction.atomic():
            return IdempotencyRecord.objects.create(client=client, key=key, request_hash=request_hash, created_at=now)
    except IntegrityError:
        pass
    record = IdempotencyRecord.objects.filter(client=client, key=key).first()
    if record is None:  # released by a failed first attempt between our insert and this read
        return _claim(client, key, request_hash)
    if record.request_hash != request_hash:
        err = IdempotencyKeyReused("This Idempotency-Key was first used with a different request.")
        return problem_response(err.status, err.code, err.title, err.detail)
    if record.status_code is not None:
        response = HttpResponse(record.body, status=record.status_code, content_type=record.content_type)
        response["Idempotent-Replayed"] = "true"
        return response
    # Take over an abandoned claim with compare-and-set: exactly one repeat wins it.
    if record.created_at < now - ABANDONED_AFTER:
        if IdempotencyRecord.objects.filter(pk=record.pk, created_at=record.created_at, status_code=None).update(
            created_at=now
        ):
            record.created_at = now
            return record
    err = IdempotencyInProgress("The first request with this Idempotency-Key has not finished; retry shortly.")
    return problem_response(err.status, err.code, err.title, err.detail, retry_after=1)


def _store(record: IdempotencyRecord, response) -> None:
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        status_code=response.status_code,
        content_type=response.get("Content-Type", ""),
        body=response.content.decode(),
    )


def _idempotent_per_item(request) -> bool:
    try:
        view = resolve(request.path_info).func
    except Resolver404:
        return False
    return getattr(getattr(view, "view_class", None), "idempotent_per_item", False)


class IdempotencyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        key = request.META.get(HEADER)
        if request.method != "POST" or key is None or not request.path.startswith("/api/"):
            return self.get_response(request)
        if not (1 <= len(key) <= 255) or not key.isascii() or not key.isprintable():
            return problem_response(
                400, "invalid_idempotency_key", "Invalid Idempotency-Key", "Use 1 to 255 printable ASCII characters."
            )
        raw = raw_key_from_header(request.META.get("HTTP_AUTHORIZATION", ""))
        client = api_client_for_key(raw) if raw else None
        if client is None:
            return self.get_response(request)  # the view answers 401

        claimed = _claim(client, key, _request_hash(request))
        if isinstance(claimed, HttpResponse):
            return claimed
        if _idempotent_per_item(request):
            try:
                response = self.get_response(request)
            except BaseException:
                IdempotencyRecord.objects.filter(pk=claimed.pk).delete()
                raise
            if response.status_code < 500:
                _store(claimed, response)
            else:
                IdempotencyRecord.objects.filter(pk=claimed.pk).delete()
            return response
        try:
            with transaction.atomic():
                response = self.get_response(request)
                if response.status_code < 400:
                    _store(claimed, response)
                else:
                    # Django turns an unhandled error into a 500 response inside this block: undo its writes.
                    transaction.set_rollback(True)
        except BaseException:
            IdempotencyRecord.objects.filter(pk=claimed.pk).delete()
            raise
        if 400 <= response.status_code < 500:
            _store(claimed, response)
        elif response.status_code >= 500:
            IdempotencyRecord.objects.filter(pk=claimed.pk).delete()
        return response
