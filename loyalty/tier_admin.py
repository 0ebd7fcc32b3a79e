"""Staff screens for tiers: definitions (saved through loyalty.tier_setup, retired rather than deleted), members'
tiers and their history (read-only), and setting a member's tier by hand with a reason and an end date."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from core.errors import ApplicationError
from loyalty.tier_models import Tier, TierChange, TierStatus
from loyalty.tier_setup import TIER_FIELDS, tier_check, tier_create, tier_retire, tier_update
from loyalty.tiers import tier_set_manual
from members.models import Member


class TierForm(forms.ModelForm):
    class Meta:
        model = Tier
        fields = ["program", "code", *TIER_FIELDS]

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        if self.instance.retired_at is not None:
            raise ValidationError(_("A retired tier cannot be changed."))
        # On a change, programme and code are read-only and so not in the form.
        program = cleaned.get("program") or self.instance.program
        candidate = Tier(pk=self.instance.pk, program=program, code=cleaned.get("code") or self.instance.code)
        for name in TIER_FIELDS:
            setattr(candidate, name, cleaned.get(name))
        try:
            tier_check(program=program, tier=candidate)
        except ApplicationError as exc:
            raise ValidationError(exc.detail) from exc
        return cleaned


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    form = TierForm
    list_display = ["code", "name_en", "program", "rank", "threshold", "earn_multiplier", "retired_at"]
    list_filter = ["program", ("retired_at", admin.EmptyFieldListFilter)]
    search_fields = ["code", "name_en", "name_sv", "name_nb"]
    ordering = ["program", "rank"]
    actions = ["retire"]

    def get_readonly_fields(self, request, obj=None):
        # History and integrations refer to the code; a tier belongs to one programme for life.
        return ["program", "code", "retired_at"] if obj else ["retired_at"]

    def save_model(self, request, obj, form, change):
        fields = {name: form.cleaned_data[name] for name in TIER_FIELDS}
        if change:
            tier_update(tier=obj, **fields)
        else:
            created = tier_create(
                program=obj.program,
                code=obj.code,
                name_en=fields.pop("name_en"),
                rank=fields.pop("rank"),
                threshold=fields.pop("threshold"),
                **fields,
            )
            obj.pk = created.pk

    def has_delete_permission(self, request, obj=None):
        return False  # retire instead: tier history refers to the tier

    @admin.action(description=_("Retire the selected tiers (members keep them until their review)"))
    def retire(self, request, queryset):
        for tier in queryset.select_related("program").order_by("pk"):
            tier_retire(tier=tier)
        self.message_user(request, _("Retired %(n)d tier(s).") % {"n": queryset.count()}, messages.SUCCESS)


class ManualTierForm(forms.Form):
    member_number = forms.CharField(max_length=10)
    tier = forms.ModelChoiceField(queryset=Tier.objects.filter(retired_at__isnull=True).select_related("program"))
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3}))
    until = forms.DateTimeField(help_text=_("When the tier set by hand ends; then the member's window decides."))

    def clean(self):
        cleaned = super().clean()
        number, tier = cleaned.get("member_number"), cleaned.get("tier")
        if number and tier:
            member = Member.objects.select_related("program").filter(member_number=number.strip()).first()
            if member is None:
                self.add_error("member_number", _("No such member."))
            elif member.program_id != tier.program_id:
                self.add_error("tier", _("The tier belongs to another programme than the member."))
            cleaned["member"] = member
        if cleaned.get("until") and cleaned["until"] <= timezone.now():
            self.add_error("until", _("Must lie in the future."))
        return cleaned


@admin.register(TierStatus)
class TierStatusAdmin(admin.ModelAdmin):
    list_display = ["member", "tier", "since", "review_at", "manual_until", "manual_reason"]
    list_filter = ["program", "tier", ("manual_until", admin.EmptyFieldListFilter)]
    search_fields = ["member__member_number", "member__email"]
    list_select_related = ["member", "tier"]
    readonly_fields = [f.name for f in TierStatus._meta.fields]

    def get_urls(self):
        urls = [path("set-manual/", self.admin_site.admin_view(self.set_manual_view), name="loyalty_tier_set_manual")]
        return urls + super().get_urls()

    def add_view(self, request, form_url="", extra_context=None):
        # "Add" is setting a tier by hand: the only way staff write a member's tier.
        return redirect("admin:loyalty_tier_set_manual")

    def has_add_permission(self, request):
        return request.user.has_perm("loyalty.change_tierstatus") or request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return obj is None and self.has_add_permission(request)

    def has_delete_permission(self, request, obj=None):
        return False

    def set_manual_view(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:index")
        form = ManualTierForm(request.POST or None, initial={"member_number": request.GET.get("member", "")})
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                tier_set_manual(
                    member=data["member"],
                    tier=data["tier"],
                    reason=data["reason"],
                    until=data["until"],
                    staff_user=request.user,
                )
            except ApplicationError as exc:
                self.message_user(request, f"Nothing was changed: {exc.detail}", messages.ERROR)
            else:
                self.message_user(
                    request, _("%(m)s is now %(t)s.") % {"m": data["member"], "t": data["tier"]}, messages.SUCCESS
                )
                return redirect(reverse("admin:loyalty_tierstatus_changelist"))
        return TemplateResponse(
            request,
            "admin/loyalty/set_tier.html",
            {**self.admin_site.each_context(request), "title": _("Set a member's tier by hand"), "form": form},
        )


@admin.register(TierChange)
class TierChangeAdmin(admin.ModelAdmin):
    list_display = ["occurred_at", "member", "from_tier", "to_tier", "reason", "note", "staff_user"]
    list_filter = ["reason", "program", "occurred_at"]
    search_fields = ["member__member_number", "note"]
    list_select_related = ["member", "from_tier", "to_tier", "staff_user"]
    date_hierarchy = "occurred_at"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
