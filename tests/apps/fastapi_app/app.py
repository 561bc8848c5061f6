"""A real FastAPI app for the ASGI tests: path and query parameters, a JSON body validated by a
pydantic model, a sync endpoint (run in a worker thread), a streaming response, a file, a
WebSocket endpoint, and lifespan state."""

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
    # What the lifespan yields is the state every request sees (request.state).
    yield {"greeting": "hello from the lifespan", "pid": str(os.getpid())}


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None) -> dict[str, object]:
    return {"item_id": item_id, "q": q}


@app.post("/items")
async def create_item(item: Item) -> dict[str, object]:
    return {"name": item.name, "double": item.price * 2, "tags": item.tags}


@app.get("/state")
async def state(request: Request) -> dict[str, object]:
    return {
        "greeting": request.state.greeting,
        "url": str(request.url),
        "root_path": request.scope["root_path"],
        "url_for": str(request.url_for("state")),
    }


@app.get("/sync")
def sync_endpoint() -> dict[str, object]:
    return {"main_thread": threading.current_thread() is threading.main_thread()}


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        for i in range(5):
            yield f"chunk {i}\n"
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="text/plain")


@app.get("/file")
async def file() -> FileResponse:
    return FileResponse(__file__, media_type="text/x-python")


@app.get("/fail")
async def fail() -> None:
    raise RuntimeError("fastapi endpoint failed on purpose")


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_json({"echo": text, "greeting": websocket.state.greeting})
    except WebSocketDisconnect:
        pass
