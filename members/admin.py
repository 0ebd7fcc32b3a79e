"""Staff view of members. Every change goes through members.services, so normalisation, uniqueness and the consent
history hold in the admin exactly as over the API."""

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from core.errors import ApplicationError
from loyalty.admin import PointsAdjustmentAdmin
from members.models import ConsentEvent, Identifier, Member
from members.normalize import normalize_email, normalize_phone
from members.services import member_enroll, member_update

DETAIL_FIELDS = ["first_name", "last_name", "email", "phone", "birth_date", "locale", "timezone"]
CONSENT_FIELDS = {"consent_email": "email", "consent_sms": "sms", "consent_push": "push"}


class _DryRun(Exception):
    pass


class MemberForm(forms.ModelForm):
    """Validates by running the service in a savepoint that is rolled back, so staff see the service's own field
    errors (bad phone, email taken) on the form; the admin then saves through the same service."""

    class Meta:
        model = Member
        fields = ["program", *DETAIL_FIELDS, "status", *CONSENT_FIELDS]

    def service_call(self, *, source: str):
        if self.instance.pk is None:
            data = {f: self.cleaned_data.get(f) for f in DETAIL_FIELDS}
            data["email"] = data["email"] or None
            data["phone"] = data["phone"] or None
            status = self.cleaned_data.get("status") or Member.Status.ACTIVE

            def enrol():
                member = member_enroll(
                    program=self.cleaned_data["program"],
                    **data,
                    consents={ch: bool(self.cleaned_data.get(f)) for f, ch in CONSENT_FIELDS.items()},
                    enrollment_channel="admin",
                    source=source,
                )
                if status != Member.Status.ACTIVE:
                    member = member_update(member=member, status=status, source=source)
                return member

            return enrol
        changes = {f: self.cleaned_data.get(f) for f in self.changed_data if f in DETAIL_FIELDS or f == "status"}
        for field in ("email", "phone"):
            if field in changes:
                changes[field] = changes[field] or None
        consents = {ch: bool(self.cleaned_data.get(f)) for f, ch in CONSENT_FIELDS.items() if f in self.changed_data}
        if consents:
            changes["consents"] = consents
        member = Member.objects.get(pk=self.instance.pk)
        return lambda: member_update(member=member, source=source, **changes)

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        try:
            with transaction.atomic():
                self.service_call(source="admin:validation")()
                raise _DryRun
        except _DryRun:
            pass
        except ApplicationError as exc:
            for field, messages in (exc.errors or {None: [exc.detail]}).items():
                self.add_error(field if field in self.fields else None, messages)
        return cleaned


class IdentifierInline(admin.TabularInline):
    model = Identifier
    fields = ["kind", "channel", "value", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class ConsentEventInline(admin.TabularInline):
    model = ConsentEvent
    fields = ["occurred_at", "channel", "granted", "source"]
    readonly_fields = fields
    ordering = ["-occurred_at", "-id"]
    extra = 0
    can_delete = False
    verbose_name_plural = _("Consent history")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Member)
class MemberAdmin(PointsAdjustmentAdmin, admin.ModelAdmin):
    form = MemberForm
    list_display = ["member_number", "email", "phone", "first_name", "last_name", "status", "enrolled_at"]
    list_filter = ["status", "enrollment_channel", "locale", "program"]
    search_fields = ["member_number", "email", "phone", "first_name", "last_name", "identifiers__value"]
    readonly_fields = ["member_number", "enrollment_channel", "enrolled_at", "updated_at"]
    inlines = [IdentifierInline, ConsentEventInline]
    date_hierarchy = "enrolled_at"
    list_select_related = ["program"]

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "program"] if obj else self.readonly_fields

    def get_inlines(self, request, obj):
        return self.inlines if obj else []

    def get_search_results(self, request, queryset, search_term):
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        # Staff type a phone or email the way the member says it ("070-123 45 67"); the database holds it normalised.
        term = search_term.strip()
        extra = Q()
        for normalize, field in ((normalize_phone, "phone"), (normalize_email, "email")):
            try:
                extra |= Q(**{field: normalize(term)})
            except ValidationError:  # a term that is not a phone or email simply adds nothing
                continue
        if term and extra:
            results |= queryset.filter(extra)
        return results, may_have_duplicates

    def save_model(self, request, obj: Member, form, change):
        member = form.service_call(source=f"admin:{request.user.get_username()}")()
        # The admin goes on with `obj` (log entry, redirect): make it the row the service wrote.
        obj.pk, obj.member_number = member.pk, member.member_number
        obj._state.adding = False
