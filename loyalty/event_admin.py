"""Staff screens for custom events and referrals. Event types are edited here; events and referrals are history."""

from django.contrib import admin

from loyalty.admin import ReadOnlyAdmin
from loyalty.event_models import EventType, MemberEvent, Referral


@admin.register(EventType)
class EventTypeAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "program", "points", "limit_count", "limit_period", "qualifying", "active"]
    list_filter = ["program", "active", "qualifying", "limit_period"]
    search_fields = ["code", "name"]

    def get_readonly_fields(self, request, obj=None):
        # Integrations send the code, and recorded events were recorded under it.
        return ["program", "code", "created_at", "updated_at"] if obj else ["created_at", "updated_at"]

    def has_delete_permission(self, request, obj=None):
        # Recorded events point at their type; retire it (active off) instead.
        return False


@admin.register(MemberEvent)
class MemberEventAdmin(ReadOnlyAdmin):
    list_display = ["external_id", "member", "event_type", "occurred_at", "points", "outcome"]
    list_filter = ["outcome", "event_type"]
    search_fields = ["external_id", "member__member_number"]
    list_select_related = ["member", "event_type"]
    date_hierarchy = "occurred_at"


@admin.register(Referral)
class ReferralAdmin(ReadOnlyAdmin):
    list_display = ["referee", "referrer", "referrer_points", "referee_points", "transaction", "created_at"]
    search_fields = ["referee__member_number", "referrer__member_number"]
    list_select_related = ["referee", "referrer", "transaction"]
    date_hierarchy = "created_at"
