"""Creating, changing and retiring event types. A change never rewrites points already given: each member event
stored its own points."""

from django.db import IntegrityError, transaction

from core.errors import Conflict, InvalidInput
from core.models import Program
from loyalty.event_models import EventType

EDITABLE = ["code", "name", "description", "points", "limit_count", "limit_period", "qualifying", "active"]


def _check(event_type: EventType) -> None:
    """Refuse definitions that cannot work, field by field, before the database sees them."""
    errors: dict[str, list[str]] = {}
    if event_type.points is None or event_type.points < 1:
        errors.setdefault("points", []).append("Must be at least 1.")
    if event_type.limit_count is not None and event_type.limit_count < 1:
        errors.setdefault("limit_count", []).append("Must be at least 1, or empty for no limit.")
    if errors:
        raise InvalidInput("The event type is not valid.", errors=errors)


def _save(event_type: EventType) -> EventType:
    _check(event_type)
    try:
        with transaction.atomic():
            event_type.save()
    except IntegrityError as exc:
        raise Conflict(
            f"The programme already has an event type '{event_type.code}'.",
            code="event_type_exists",
            errors={"code": ["Already taken."]},
        ) from exc
    return event_type


def event_type_create(*, program: Program, **fields) -> EventType:
    """A new event type; InvalidInput or Conflict (code taken), nothing written, when it cannot be."""
    return _save(EventType(program=program, **{k: v for k, v in fields.items() if k in EDITABLE}))


def event_type_update(*, event_type: EventType, **changes) -> EventType:
    """Change an event type from now on; events already recorded keep their points. Its code never changes:
    integrations send it, and the events already recorded were recorded under it."""
    if "code" in changes and changes["code"] != event_type.code:
        raise InvalidInput(
            "An event type's code cannot change: events recorded under it name it. Retire it and create another.",
            errors={"code": ["Cannot change."]},
        )
    for name, value in changes.items():
        if name in EDITABLE:
            setattr(event_type, name, value)
    return _save(event_type)


def event_type_retire(*, event_type: EventType) -> EventType:
    """Stop an event type: new events of it are refused. It stays for the history of the events it gave."""
    return event_type_update(event_type=event_type, active=False)
