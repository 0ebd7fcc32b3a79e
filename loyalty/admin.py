"""Staff screens for the ledger. Everything here is read-only except adjustments, which go through the service."""

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _

from core.errors import ApplicationError
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.points import MAX_ADJUSTMENT, points_adjust
from members.models import Member


class ReadOnlyAdmin(admin.ModelAdmin):
    """The ledger is append-only: staff look, and correct with adjustments."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class AdjustmentForm(forms.Form):
    points = forms.IntegerField(
        min_value=-MAX_ADJUSTMENT, max_value=MAX_ADJUSTMENT, help_text=_("Positive adds, negative removes.")
    )
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3}))

    def clean_points(self):
        if self.cleaned_data["points"] == 0:
            raise forms.ValidationError(_("Give a number other than 0."))
        return self.cleaned_data["points"]


class EntryInline(admin.TabularInline):
    model = Entry
    fields = [
        "occurred_at",
        "kind",
        "points",
        "available_after",
        "pending_after",
        "held_after",
        "reason",
        "transaction",
        "staff_user",
    ]
    readonly_fields = fields
    ordering = ["-occurred_at", "-id"]
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("transaction", "staff_user")


class PointsAdjustmentAdmin:
    """The adjustment action with its reason, for the admins of accounts and of members. An account is keyed by its
    member, so either admin's selection names the members; a member's account need not be opened yet (a newly
    enrolled member): the first adjustment opens it."""

    actions = ["adjust_points"]

    @admin.action(description=_("Adjust points of the selected members"), permissions=["adjust"])
    def adjust_points(self, request, queryset):
        members = Member.objects.filter(pk__in=queryset.values("pk")).select_related("program").order_by("pk")
        if "apply" in request.POST:
            form = AdjustmentForm(request.POST)
            if form.is_valid():
                try:
                    # All or nothing: one member short of points leaves every account as it was.
                    with transaction.atomic():
                        for member in members:
                            points_adjust(member=member, staff_user=request.user, **form.cleaned_data)
                except ApplicationError as exc:
                    self.message_user(request, f"Nothing was adjusted: {exc.detail}", messages.ERROR)
                    return None
                done = {"n": len(members), "p": form.cleaned_data["points"]}
                self.message_user(request, _("Adjusted %(n)d account(s) by %(p)+d points.") % done)
                return None
        else:
            form = AdjustmentForm()
        opened = Account.objects.in_bulk([member.pk for member in members])
        return TemplateResponse(
            request,
            "admin/loyalty/adjust_points.html",
            {
                **self.admin_site.each_context(request),
                "title": _("Adjust points"),
                "form": form,
                # An account not opened yet shows as the empty one its first write opens.
                "accounts": [opened.get(member.pk) or Account(member=member) for member in members],
                "opts": self.model._meta,
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            },
        )

    def has_adjust_permission(self, request):
        return request.user.has_perm("loyalty.add_entry") or request.user.is_superuser


@admin.register(Account)
class AccountAdmin(PointsAdjustmentAdmin, ReadOnlyAdmin):
    list_display = ["member", "available", "pending", "lifetime_earned", "updated_at"]
    search_fields = ["member__member_number", "member__email", "member__phone", "member__identifiers__value"]
    list_select_related = ["member"]
    readonly_fields = ["member", "available", "pending", "lifetime_earned", "updated_at"]
    inlines = [EntryInline]


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "account", "kind", "points", "available_after", "occurred_at", "reason", "staff_user"]
    list_filter = ["kind", "occurred_at"]
    search_fields = ["account__member__member_number", "reason", "transaction__external_id"]
    list_select_related = ["account__member", "staff_user"]
    date_hierarchy = "occurred_at"


@admin.register(Lot)
class LotAdmin(ReadOnlyAdmin):
    list_display = ["entry_id", "account", "amount", "remaining", "available_from", "expires_at", "matured"]
    list_filter = ["matured"]
    search_fields = ["account__member__member_number"]
    list_select_related = ["account__member"]


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyAdmin):
    list_display = ["external_id", "store", "channel", "kind", "member", "total", "currency", "points", "occurred_at"]
    list_filter = ["kind", "channel", "occurred_at"]
    search_fields = ["external_id", "store", "member__member_number"]
    list_select_related = ["member"]
    date_hierarchy = "occurred_at"


import loyalty.event_admin  # noqa: E402,F401  (custom events and referrals)
import loyalty.rule_admin  # noqa: E402,F401  (earning rules)
import loyalty.tier_admin  # noqa: E402,F401  (tiers: definitions, members, history)
