"""Fine-tuning routes, after OpenAI's API: jobs (create, list, get, events as a stream, cancel) and dataset
uploads (``POST /v1/files`` with a zip of image + caption pairs)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from glideserve.errors import GlideServeError, InvalidRequestError
from glideserve.server.errors import BodyReadError
from glideserve.server.images import get_state, require_api_key
from glideserve.server.protocol import ErrorResponse, FineTuningJobRequest

EVENT_POLL_S = 0.5


class FineTuningOffError(GlideServeError):
    http_status = 404
    code = "fine_tuning_disabled"


def _service(request: Request):
    service = getattr(get_state(request).backend, "fine_tuning", None)
    if service is None:
        raise FineTuningOffError("fine-tuning is off; start the server with --data-dir DIR (and --lora-dir for "
                                 "the adapters it produces)")
    return service


def router() -> APIRouter:
    routes = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                       responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 413)})

    @routes.post("/fine_tuning/jobs")
    async def create_job(body: FineTuningJobRequest, request: Request) -> dict:
        """Queue a job; its dataset is validated first (a bad one is a 400 naming the file)."""
        from glideserve.finetune.trainer import DEFAULT_TARGETS, FineTuneConfig

        service = _service(request)
        h = body.hyperparameters
        config = FineTuneConfig(model=body.model, dataset=body.training_file, adapter_name=body.suffix,
                                rank=h.lora_rank, alpha=h.lora_alpha,
                                target_modules=tuple(h.target_modules or DEFAULT_TARGETS), steps=h.n_steps,
                                batch_size=h.batch_size, learning_rate=h.learning_rate, seed=body.seed,
                                checkpoint_every=h.checkpoint_every)
        job = await asyncio.to_thread(service.create, config)
        return job.as_dict()

    @routes.get("/fine_tuning/jobs")
    async def list_jobs(request: Request) -> dict:
        jobs = sorted(_service(request).jobs.values(), key=lambda j: j.created_at, reverse=True)
        return {"object": "list", "data": [j.as_dict() for j in jobs], "has_more": False}

    @routes.get("/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict:
        return _service(request).get(job_id).as_dict()

    @routes.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request) -> dict:
        """Stop a job; its trainer and optimizer memory are freed before the engine's next micro-step."""
        return _service(request).cancel(job_id).as_dict()

    @routes.get("/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request,
                         stream: bool = Query(True, description="Server-Sent Events until the job ends")):
        """The job's events (progress, loss, pauses): streamed, or the list so far with ``stream=false``."""
        service = _service(request)
        job = service.get(job_id)
        if not stream:
            return {"object": "list", "data": list(job.events), "has_more": False}

        async def events():
            seen = 0
            while True:
                new = [e for e in list(job.events) if e["seq"] > seen]
                for event in new:
                    seen = event["seq"]
                    yield f"event: fine_tuning.job.event\ndata: {json.dumps(event)}\n\n"
                if job.status in ("succeeded", "failed", "cancelled") and not new:
                    yield f"event: fine_tuning.job\ndata: {json.dumps(job.as_dict())}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(EVENT_POLL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @routes.post("/files")
    async def upload_dataset(request: Request, file: UploadFile = File(description="a zip of image + caption pairs"),
                             purpose: str = Form(..., description="fine-tune")) -> dict:
        """A dataset for fine-tuning: the zip is checked (size, entries, names, compression) and unpacked
        under --data-dir; its id is the ``training_file`` of a job."""
        service = _service(request)
        if purpose != "fine-tune":
            raise InvalidRequestError("purpose must be 'fine-tune' (the only files this server takes)", "purpose")
        limit = service.limits.max_zip_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise BodyReadError(413, "request_too_large", f"the dataset zip exceeds {limit} bytes")
        return await asyncio.to_thread(service.add_dataset, data)

    return routes
