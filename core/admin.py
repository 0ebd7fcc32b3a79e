"""Programmes and API clients. A client's key is generated here and shown once; only its hash is kept."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from core.errors import ApplicationError
from core.models import ApiClient, Program
from loyalty.tier_models import Tier
from loyalty.tier_setup import PROGRAM_FIELDS, program_measure_check, program_settings_update


class ProgramForm(forms.ModelForm):
    class Meta:
        model = Program
        fields = [
            "code",
            "currency",
            "timezone",
            *PROGRAM_FIELDS,
            "hold_minutes",
            "point_value",
            "voucher_return_policy",
            "referrals_enabled",
            "referral_referrer_points",
            "referral_referee_points",
            "referral_min_purchase",
        ]

    def clean(self):
        cleaned = super().clean()
        if self.instance.pk and "tier_measure" in self.changed_data and "tier_measure" in cleaned:
            try:
                program_measure_check(list(Tier.objects.filter(program=self.instance)), cleaned["tier_measure"])
            except ApplicationError as exc:
                raise ValidationError(exc.detail) from exc
        return cleaned


@admin.register(Program)
class ProgramAdmin(admin.ModelAdmin):
    form = ProgramForm
    list_display = ["code", "name", "currency", "points_per_unit", "rounding", "pending_days", "expiry_months"]
    search_fields = ["code", "name"]
    readonly_fields = ["created_at", "updated_at"]

    def get_readonly_fields(self, request, obj=None):
        # Members, keys and ledger rows refer to the programme by its code in integrations; it does not change.
        return [*self.readonly_fields, "code"] if obj else self.readonly_fields

    @transaction.atomic
    def save_model(self, request, obj: Program, form, change):
        if not change:
            super().save_model(request, obj, form, change)
            return
        # The earning and tier settings through the service the API uses: a new measure or window recounts the
        # members' qualifying counters, and the programme's tier cache is dropped. It compares with the settings as
        # stored, so it is handed the programme as read, not the form's instance, which holds the new values.
        settings = {name: form.cleaned_data[name] for name in form.changed_data if name in PROGRAM_FIELDS}
        others = [name for name in form.changed_data if name not in PROGRAM_FIELDS]
        if others:
            obj.save(update_fields=[*others, "updated_at"])
        if settings:
            program_settings_update(program=Program.objects.get(pk=obj.pk), **settings)


class ApiClientForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=ApiClient.Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("What the system may do. Grant only what it needs."),
    )

    class Meta:
        model = ApiClient
        fields = ["program", "name", "scopes"]

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        # On a change the programme is read-only, so it is not in the form and the model's constraint check skips it;
        # the database constraint still decides, this only gives staff a message instead of an error page.
        if self.instance.pk:
            taken = ApiClient.objects.filter(program_id=self.instance.program_id, name=name).exclude(
                pk=self.instance.pk
            )
            if taken.exists():
                raise forms.ValidationError(_("This programme already has an API client with this name."))
        return name


@admin.register(ApiClient)
class ApiClientAdmin(admin.ModelAdmin):
    form = ApiClientForm
    list_display = ["name", "program", "key_prefix", "scope_list", "last_used_at", "revoked_at", "created_at"]
    list_filter = ["program", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "key_prefix"]
    readonly_fields = ["key_prefix", "created_at", "created_by", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_readonly_fields(self, request, obj=None):
        # A key belongs to one programme for life: moving it would hand one programme's members to another's system.
        return [*self.readonly_fields, "program"] if obj else self.readonly_fields

    @admin.display(description=_("Scopes"))
    def scope_list(self, obj: ApiClient) -> str:
        return ", ".join(obj.scopes)

    def save_model(self, request, obj: ApiClient, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        raw_key = obj.set_new_key()
        obj.created_by = request.user
        super().save_model(request, obj, form, change)
        messages.warning(
            request,
            _("The key of “%(name)s” is %(key)s — copy it now: it is not stored and will not be shown again.")
            % {"name": obj.name, "key": raw_key},
        )

    @admin.action(description=_("Revoke the selected API clients' keys"))
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(
            request,
            _("Revoked %(count)d key(s). Running processes may accept a revoked key for a few more seconds.")
            % {"count": count},
            messages.SUCCESS,
        )
