"""Staff screens for rewards: the catalogue, stock changes (audited, through the service), redemptions with
cancellation, voucher look-up, holds, and points spent per reward and period."""

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.translation import gettext_lazy as _

from core.errors import ApplicationError
from rewards.codes import voucher_code_display, voucher_code_normalize
from rewards.models import Hold, Redemption, Reward, StockChange, Voucher
from rewards.selectors import points_spent_report
from rewards.services.catalogue import MAX_STOCK_DELTA, reward_stock_change
from rewards.services.redemptions import redemption_cancel


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class StockChangeInline(admin.TabularInline):
    model = StockChange
    fields = ["created_at", "delta", "stock_after", "reason", "staff_user", "api_client"]
    readonly_fields = fields
    ordering = ["-created_at"]
    extra = 0
    max_num = 0
    can_delete = False


class PeriodForm(forms.Form):
    period = forms.ChoiceField(choices=[(p, p) for p in ("day", "week", "month", "year")], initial="month")
    since = forms.DateTimeField(required=False)
    until = forms.DateTimeField(required=False)


@admin.register(Reward)
class RewardAdmin(admin.ModelAdmin):
    list_display = ["code", "name_en", "kind", "points_cost", "stock", "member_limit", "active", "program"]
    list_filter = ["program", "kind", "active"]
    search_fields = ["code", "name_en", "name_sv", "name_nb"]
    # Stock moves only through audited stock changes: a form saving an absolute number would overwrite items
    # redemptions took while the form was open.
    readonly_fields = ["created_at", "updated_at"]
    inlines = [StockChangeInline]
    change_list_template = "admin/rewards/reward_change_list.html"

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "stock"] if obj else self.readonly_fields

    def get_urls(self):
        return [
            path("points-spent/", self.admin_site.admin_view(self.points_spent_view), name="rewards_points_spent"),
            *super().get_urls(),
        ]

    def points_spent_view(self, request):
        form = PeriodForm(request.GET or None)
        rows = []
        if form.is_valid() or not request.GET:
            data = form.cleaned_data if request.GET else {"period": "month"}
            for program in {r.program for r in Reward.objects.select_related("program")}:
                for row in points_spent_report(
                    program=program, period=data["period"], since=data.get("since"), until=data.get("until")
                ):
                    rows.append({**row, "program": program.code})
        context = {
            **self.admin_site.each_context(request),
            "title": _("Points spent per reward and period"),
            "form": form,
            "rows": rows,
            "total": sum(r["points"] for r in rows),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rewards/points_spent.html", context)


@admin.register(StockChange)
class StockChangeAdmin(admin.ModelAdmin):
    """Adding a stock change here applies it through the service, which moves the counter atomically."""

    list_display = ["created_at", "reward", "delta", "stock_after", "reason", "staff_user"]
    list_filter = ["reward__program"]
    search_fields = ["reward__code", "reason"]
    fields = ["reward", "delta", "reason"]
    autocomplete_fields = ["reward"]

    def has_change_permission(self, request, obj=None):
        return obj is None

    def has_delete_permission(self, request, obj=None):
        return False

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        form.base_fields["delta"].help_text = _("Positive adds items, negative removes them (at most %s).") % (
            f"{MAX_STOCK_DELTA:,}"
        )
        base_clean = form.clean

        def clean(self):
            # A friendly early refusal; the service's guarded UPDATE still decides, should stock move meanwhile.
            data = base_clean(self)
            reward, delta = data.get("reward"), data.get("delta")
            if reward is not None and delta is not None:
                if reward.stock is None:
                    raise forms.ValidationError(_("This reward has unlimited stock."))
                if not delta or abs(delta) > MAX_STOCK_DELTA:
                    raise forms.ValidationError(
                        _("Give a number other than 0, at most %s either way.") % MAX_STOCK_DELTA
                    )
                if reward.stock + delta < 0:
                    raise forms.ValidationError(_("Only %d left.") % reward.stock)
            return data

        form.clean = clean
        return form

    def save_model(self, request, obj, form, change):
        try:
            saved = reward_stock_change(reward=obj.reward, delta=obj.delta, reason=obj.reason, staff_user=request.user)
        except ApplicationError as exc:
            # The admin has already validated the form; the service's refusal (too little stock) is shown instead.
            self.message_user(request, exc.detail, messages.ERROR)
            obj.pk = None
            return
        obj.pk, obj.stock_after, obj.created_at = saved.pk, saved.stock_after, saved.created_at

    def response_add(self, request, obj, post_url_continue=None):
        if obj.pk is None:
            return self.response_post_save_add(request, obj)
        return super().response_add(request, obj, post_url_continue)


@admin.register(Redemption)
class RedemptionAdmin(ReadOnlyAdmin):
    list_display = ["pk", "created_at", "member", "reward", "points", "status", "voucher_code"]
    list_filter = ["status", "reward__kind", "program"]
    search_fields = ["member__member_number", "reward__code", "voucher__code"]
    list_select_related = ["member", "reward", "voucher"]
    date_hierarchy = "created_at"
    actions = ["cancel"]

    @admin.display(description=_("voucher"))
    def voucher_code(self, obj):
        return voucher_code_display(obj.voucher.code)

    @admin.action(description=_("Cancel and refund the points (unused vouchers only)"))
    def cancel(self, request, queryset):
        done = 0
        for redemption in queryset.order_by("pk"):
            try:
                redemption_cancel(redemption=redemption, staff_user=request.user)
                done += 1
            except ApplicationError as exc:
                self.message_user(request, f"Redemption {redemption.pk}: {exc.detail}", messages.WARNING)
        self.message_user(request, _("%d redemptions cancelled.") % done)

    def has_change_permission(self, request, obj=None):
        return obj is None  # the action needs change permission on the list; no edit form


@admin.register(Voucher)
class VoucherAdmin(ReadOnlyAdmin):
    list_display = ["display_code", "status", "expires_at", "used_store", "used_transaction_external_id", "used_at"]
    list_filter = ["status", "program"]
    list_select_related = ["redemption"]

    @admin.display(description=_("code"), ordering="code")
    def display_code(self, obj):
        return voucher_code_display(obj.code)

    def get_search_results(self, request, queryset, search_term):
        # Staff type the code as printed (dashes, lower case, O for 0); search by its canonical form.
        code = voucher_code_normalize(search_term)
        if code:
            return queryset.filter(code=code), False
        return queryset.filter(used_transaction_external_id=search_term.strip()), False

    search_fields = ["code"]


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ["pk", "created_at", "member", "points", "store", "status", "expires_at", "captured_points"]
    list_filter = ["status", "program"]
    search_fields = ["member__member_number", "transaction_external_id"]
    list_select_related = ["member"]
