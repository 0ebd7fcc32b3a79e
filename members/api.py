# Placeholder so URLs import; the members API is written next.
from rest_framework.views import APIView


class MemberEnrollApi(APIView):
    scopes = {}


class MemberLookupApi(APIView):
    scopes = {}


class MemberDetailApi(APIView):
    scopes = {}
