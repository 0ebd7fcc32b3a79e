"""Staff screens for earning rules: edited through loyalty.rule_services, so the admin refuses what the API refuses,
and retired (made inactive) rather than deleted: purchases' breakdowns name them."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from core.errors import ApplicationError
from loyalty.rule_models import EarningRule
from loyalty.rule_services import (
    EDITABLE,
    earning_rule_check,
    earning_rule_create,
    earning_rule_retire,
    earning_rule_update,
)


class EarningRuleForm(forms.ModelForm):
    class Meta:
        model = EarningRule
        fields = ["program", *EDITABLE]

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        # On a change, programme and code are read-only and so not in the form.
        program = cleaned.get("program") or self.instance.program
        code = cleaned.get("code") or self.instance.code
        candidate = EarningRule(pk=self.instance.pk, program=program)
        for name in EDITABLE:
            setattr(candidate, name, cleaned[name] if name in cleaned else getattr(self.instance, name))
        candidate.code = code
        try:
            earning_rule_check(candidate)
        except ApplicationError as exc:
            raise ValidationError(
                [f"{name}: {message}" for name, messages_ in (exc.errors or {}).items() for message in messages_]
                or exc.detail
            ) from exc
        taken = EarningRule.objects.filter(program=program, code=code).exclude(pk=self.instance.pk)
        if not self.instance.pk and taken.exists():
            self.add_error("code", _("The programme already has a rule with this code."))
        return cleaned


@admin.register(EarningRule)
class EarningRuleAdmin(admin.ModelAdmin):
    form = EarningRuleForm
    list_display = [
        "code",
        "name",
        "program",
        "benefit",
        "value",
        "priority",
        "exclusive",
        "active",
        "valid_from",
        "valid_until",
        "budget",
        "budget_used",
    ]
    list_filter = ["program", "active", "benefit", "exclusive"]
    search_fields = ["code", "name"]
    ordering = ["program", "-priority", "pk"]
    actions = ["retire"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("budget_slices")

    def get_readonly_fields(self, request, obj=None):
        # Breakdowns name the rule by its code, and a rule belongs to one programme for life.
        return ["program", "code", "budget_used"] if obj else ["budget_used"]

    def save_model(self, request, obj, form, change):
        fields = {name: form.cleaned_data[name] for name in EDITABLE if name in form.cleaned_data}
        if change:
            earning_rule_update(rule=obj, **fields)
        else:
            obj.pk = earning_rule_create(program=obj.program, **fields).pk

    def has_delete_permission(self, request, obj=None):
        return False  # retire instead: purchases' breakdowns refer to the rule

    @admin.action(description=_("Retire the selected rules (purchases keep the points they gave)"))
    def retire(self, request, queryset):
        rules = list(queryset.select_related("program").order_by("pk"))
        for rule in rules:
            earning_rule_retire(rule=rule)
        self.message_user(request, _("Retired %(n)d rule(s).") % {"n": len(rules)}, messages.SUCCESS)
