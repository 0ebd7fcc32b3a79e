from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from core import api as core_api
from core.hotpath import HotRoute
from loyalty import account_api, event_api, rule_api, tier_api
from loyalty import api as loyalty_api
from members import api as members_api
from rewards.api import catalogue as rewards_catalogue
from rewards.api import holds as rewards_holds
from rewards.api import redemptions as rewards_redemptions

api_v1 = [
    path("program", core_api.ProgramApi.as_view()),
    path("tiers", tier_api.TierListApi.as_view()),
    path("tiers/<str:code>", tier_api.TierDetailApi.as_view()),
    path("members", members_api.MemberEnrollApi.as_view()),
    path("members/lookup", members_api.MemberLookupApi.as_view()),
    path("members/<str:member_number>", members_api.MemberDetailApi.as_view()),
    path("members/<str:member_number>/balance", account_api.BalanceApi.as_view()),
    path("members/<str:member_number>/activity", account_api.ActivityApi.as_view()),
    path("members/<str:member_number>/adjustments", account_api.AdjustmentApi.as_view()),
    path("transactions", loyalty_api.TransactionApi.as_view()),
    path("transactions/preview", loyalty_api.TransactionPreviewApi.as_view()),
    path("transactions/batch", loyalty_api.TransactionBatchApi.as_view()),
    path("rewards", rewards_catalogue.RewardListApi.as_view()),
    path("rewards/<slug:code>", rewards_catalogue.RewardDetailApi.as_view()),
    path("rewards/<slug:code>/stock", rewards_catalogue.RewardStockApi.as_view()),
    path("redemptions", rewards_redemptions.RedemptionApi.as_view()),
    path("redemptions/<int:redemption_id>", rewards_redemptions.RedemptionDetailApi.as_view()),
    path("redemptions/<int:redemption_id>/cancel", rewards_redemptions.RedemptionCancelApi.as_view()),
    path("vouchers/<str:code>", rewards_redemptions.VoucherDetailApi.as_view()),
    path("vouchers/<str:code>/consume", rewards_redemptions.VoucherConsumeApi.as_view()),
    path("vouchers/<str:code>/restore", rewards_redemptions.VoucherRestoreApi.as_view()),
    path("points/holds", rewards_holds.HoldApi.as_view()),
    path("points/holds/<int:hold_id>", rewards_holds.HoldDetailApi.as_view()),
    path("points/holds/<int:hold_id>/capture", rewards_holds.HoldCaptureApi.as_view()),
    path("points/holds/<int:hold_id>/release", rewards_holds.HoldReleaseApi.as_view()),
    path("earning-rules", rule_api.EarningRuleListApi.as_view()),
    path("earning-rules/<slug:code>", rule_api.EarningRuleDetailApi.as_view()),
    path("events", event_api.EventApi.as_view()),
    path("event-types", event_api.EventTypeListApi.as_view()),
    path("event-types/<slug:code>", event_api.EventTypeDetailApi.as_view()),
]

# The till's hottest calls: their views' handlers are called without the middleware chain and DRF's dispatch
# (core/hotpath.py); the routes above serve whatever the short way declines.
hot_routes = [
    HotRoute("POST", "api/v1/transactions", loyalty_api.TransactionApi),
    HotRoute("GET", "api/v1/members/<str:member_number>/balance", account_api.BalanceApi),
    HotRoute("POST", "api/v1/redemptions", rewards_redemptions.RedemptionApi),
    HotRoute("POST", "api/v1/points/holds", rewards_holds.HoldApi),
    HotRoute("POST", "api/v1/points/holds/<int:hold_id>/capture", rewards_holds.HoldCaptureApi),
    HotRoute("POST", "api/v1/points/holds/<int:hold_id>/release", rewards_holds.HoldReleaseApi),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", core_api.health),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/v1/", include(api_v1)),
]

handler400 = "core.errors.handler400"
handler404 = "core.errors.handler404"
handler500 = "core.errors.handler500"
