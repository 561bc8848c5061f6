"""The control plane, client side: finding a core and talking to it with time limits.

Used by ``appmanager status``, ``restart``, ``stop``, ``detach`` and ``top``. A call never hangs: a
dead or stuck core is reported within the time limit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from typing import Any

import zmq

from appmanager import instances

DEFAULT_TIMEOUT = 5.0


class ControlError(Exception):
    """The core could not be found or reached, or refused the command; the message says which."""


def find_instance(directory: str | None) -> instances.Instance:
    """The core to talk to: the one in ``directory``, or the only one this user runs."""
    if directory is not None:
        directory = os.path.abspath(directory)
        instance = instances.read(directory)
        if instance is None:
            raise ControlError(f"no running appmanager in {directory}")
        return instance
    running = instances.running()
    if not running:
        raise ControlError("no running appmanager found for this user")
    if len(running) > 1:
        listing = "\n".join(
            f"  --instance-dir {i.directory}   (pid {i.pid}, {i.url}, {', '.join(i.apps)})"
            for i in running
        )
        raise ControlError(f"several appmanagers are running; pick one:\n{listing}")
    return running[0]


def call(instance: instances.Instance, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request and return the reply; raises ControlError on a time-out or refusal."""
    path = os.path.join(instance.directory, "control.sock")
    if not os.path.exists(path):
        raise ControlError(f"the core at {instance.directory} has no control socket")
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        sock.connect(f"ipc://{path}")
        sock.send(json.dumps(request).encode())
        reply: dict[str, Any] = json.loads(sock.recv())
    except zmq.Again:
        raise ControlError(
            f"the core at {instance.directory} (pid {instance.pid}) did not answer within "
            f"{timeout:g} s"
        ) from None
    finally:
        sock.close(0)
        context.term()
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the command failed")))
    return reply


def events(
    instance: instances.Instance, timeout: float
) -> Generator[dict[str, Any] | None, None, None]:
    """Events as the core publishes them; None each time ``timeout`` passes without one."""
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"ipc://{os.path.join(instance.directory, 'events.sock')}")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while True:
            if poller.poll(int(timeout * 1000)):
                yield json.loads(sock.recv())
            else:
                yield None
    finally:
        sock.close(0)
        context.term()
