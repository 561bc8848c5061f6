"""The smallest app appmanager can serve: a WSGI callable named ``application``."""


def application(environ, start_response):
    name = environ.get("QUERY_STRING", "").partition("name=")[2] or "world"
    body = f"Hello, {name}! Served by appmanager.\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
