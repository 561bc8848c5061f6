import hashlib
import os

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt


def index(request):
    return HttpResponse("Hello from Django\n", content_type="text/plain")


def info(request):
    return JsonResponse(
        {
            "pid": os.getpid(),
            "path": request.path,
            "query": request.GET.dict(),
            "host": request.get_host(),
            "method": request.method,
            "secure": request.is_secure(),
            "remote_addr": request.META.get("REMOTE_ADDR"),
        }
    )


@csrf_exempt
def form(request):
    return JsonResponse({"fields": request.POST.dict(), "files": list(request.FILES)})


@csrf_exempt
def upload(request):
    f = request.FILES["file"]
    data = f.read()
    return JsonResponse({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def stream(request):
    return StreamingHttpResponse((f"row {i}\n" for i in range(10)), content_type="text/plain")


def boom(request):
    raise ValueError("django view failed on purpose")
