from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from src.web.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def health(request: Request) -> JSONResponse:
    """200 with the model's name and the backend (local or remote) once ready; 503 while
    loading or if loading failed."""
    state = request.app.state
    if state.service is not None:
        service = state.service
        backend = service.backend
        kv_bytes = backend.kv_cache_bytes
        body = HealthResponse(
            status="ok",
            model=service.model_name,
            backend=backend.kind,
            context_window=backend.context_window,
            kv_cache_mb=None if kv_bytes is None else round(kv_bytes / 2**20, 1),
            decoding=asdict(backend.engine.stats) if backend.kind == "local" else None,
        )
        return JSONResponse(body.model_dump())
    if state.load_error:
        body = HealthResponse(status="error", detail=state.load_error)
    else:
        body = HealthResponse(status="loading")
    return JSONResponse(body.model_dump(), status_code=503)
