"""A real Flask app for the integration tests: JSON, forms, uploads, streaming, sleeps and
crashes."""

import hashlib
import os
import time

from flask import Flask, Response, jsonify, request, stream_with_context

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from Flask\n"


@app.get("/pid")
def pid():
    return jsonify(pid=os.getpid())


@app.post("/json")
def echo_json():
    data = request.get_json()
    return jsonify(received=data, method=request.method)


@app.post("/form")
def form():
    return jsonify(dict(request.form))


@app.post("/upload")
def upload():
    f = request.files["file"]
    data = f.read()
    return jsonify(name=f.filename, size=len(data), sha256=hashlib.sha256(data).hexdigest())


@app.route("/body", methods=["POST", "PUT"])
def body():
    data = request.get_data()
    return jsonify(size=len(data), sha256=hashlib.sha256(data).hexdigest())


@app.get("/stream")
def stream():
    def generate():
        for i in range(5):
            yield f"part {i}\n"

    return Response(stream_with_context(generate()), mimetype="text/plain")


@app.get("/slow")
def slow():
    seconds = float(request.args.get("seconds", "1"))
    time.sleep(seconds)
    return jsonify(pid=os.getpid(), slept=seconds)


@app.get("/crash")
def crash():
    os._exit(3)


@app.get("/error")
def error():
    raise RuntimeError("the app failed on purpose")


@app.get("/headers")
def headers():
    return jsonify({k: v for k, v in request.headers.items()})


@app.get("/cookie")
def cookie():
    resp = jsonify(seen=request.cookies.get("n"))
    resp.set_cookie("n", "1")
    resp.set_cookie("m", "2")
    return resp
