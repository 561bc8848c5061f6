from django.urls import path

from mysite import views

urlpatterns = [
    path("", views.index),
    path("info/", views.info),
    path("form/", views.form),
    path("upload/", views.upload),
    path("stream/", views.stream),
    path("boom/", views.boom),
]
