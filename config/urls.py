from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from core import api as core_api
from loyalty import api as loyalty_api
from members import api as members_api

api_v1 = [
    path("program", core_api.ProgramApi.as_view()),
    path("members", members_api.MemberEnrollApi.as_view()),
    path("members/lookup", members_api.MemberLookupApi.as_view()),
    path("members/<str:member_number>", members_api.MemberDetailApi.as_view()),
    path("members/<str:member_number>/balance", loyalty_api.BalanceApi.as_view()),
    path("members/<str:member_number>/activity", loyalty_api.ActivityApi.as_view()),
    path("members/<str:member_number>/adjustments", loyalty_api.AdjustmentApi.as_view()),
    path("transactions", loyalty_api.TransactionApi.as_view()),
    path("transactions/preview", loyalty_api.TransactionPreviewApi.as_view()),
    path("transactions/batch", loyalty_api.TransactionBatchApi.as_view()),
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
