"""Batch tasks over HTTP (CONTRACT.md section 2 "Batch"): ``POST /chat/tasks``, ``GET
/chat/tasks/{taskId}?userId=U``; the queue and its workers are backend_stream/tasks.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from backend_stream.errors import RequestRejected
from backend_stream.logs import bind_request
from backend_stream.routes import IdPath, _chat_request, require_token, services
from backend_stream.tasks import TaskQueue
from contracts import ErrorCode
from contracts.base import ID_PATTERN, MAX_ID_LENGTH

router = APIRouter(dependencies=[Depends(require_token)])

UserParam = Annotated[str, Query(alias="userId", pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]


def task_queue(request: Request) -> TaskQueue:
    found: TaskQueue = request.app.state.tasks
    return found


@router.post("/chat/tasks")
async def create_task(request: Request) -> Response:
    """202 ``TaskAccepted``: stored and queued, or (the same taskId again) its current state."""
    req = await _chat_request(request, services(request), "task")
    accepted = await task_queue(request).accept(req)
    return Response(accepted.wire_json(), status_code=202, media_type="application/json")


@router.get("/chat/tasks/{task_id}")
async def get_task(request: Request, task_id: IdPath, user_id: UserParam) -> Response:
    """``TaskStatus``; 404 when this user has no such task (taskIds are scoped per user)."""
    bind_request(path="task_status", request_id=task_id, user_id=user_id)
    status = await task_queue(request).status(user_id, task_id)
    if status is None:
        raise RequestRejected(ErrorCode.NOT_FOUND, "no such task (or it has expired)")
    return Response(status.wire_json(), media_type="application/json")
