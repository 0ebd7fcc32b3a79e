"""Plain-cursor reads for hot paths: compiling an ORM query costs several times the query itself there."""

from functools import cache

from django.db import connection, models
from django.db.models import Model


@cache
def _select(model: type[Model]) -> tuple[list[str], str]:
    columns = [f.attname for f in model._meta.concrete_fields]
    quoted = ", ".join(connection.ops.quote_name(f.column) for f in model._meta.concrete_fields)
    return columns, f"SELECT {quoted} FROM {model._meta.db_table} WHERE "


def fetch_instance(model: type[Model], where: str, params: list):
    """The first row matching the SQL condition `where`, as a model instance, or None."""
    columns, select = _select(model)
    with connection.cursor() as cursor:
        cursor.execute(select + where + " LIMIT 1", params)
        row = cursor.fetchone()
    return None if row is None else model.from_db(connection.alias, columns, row)


# Field types whose Python value the driver takes as it is; every other field is prepared by Django.
_PLAIN = (models.CharField, models.TextField, models.IntegerField, models.BooleanField, models.ForeignKey)


@cache
def insert_plan(model: type[Model], omit: frozenset[str] = frozenset()) -> tuple[list, str]:
    """The fields an INSERT writes (all but the primary key and `omit`) and their quoted column list."""
    fields = [f for f in model._meta.concrete_fields if not f.primary_key and f.name not in omit]
    plan = [
        (f, isinstance(f, _PLAIN) and not getattr(f, "auto_now", False) and not getattr(f, "auto_now_add", False))
        for f in fields
    ]
    return plan, ", ".join(connection.ops.quote_name(f.column) for f in fields)


def insert_params(instance: Model, plan: list) -> list:
    """The values of `instance` for an INSERT of the planned fields, as Django's own INSERT would send them."""
    return [
        getattr(instance, f.attname) if plain else f.get_db_prep_save(f.pre_save(instance, add=True), connection)
        for f, plain in plan
    ]
