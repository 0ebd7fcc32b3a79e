from rest_framework.views import APIView


class BalanceApi(APIView):
    scopes = {}


class ActivityApi(APIView):
    scopes = {}


class AdjustmentApi(APIView):
    scopes = {}


class TransactionApi(APIView):
    scopes = {}


class TransactionPreviewApi(APIView):
    scopes = {}


class TransactionBatchApi(APIView):
    scopes = {}
