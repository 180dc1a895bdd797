"""GET /metrics: the server's metrics in Prometheus' text format (``src/web/metrics.py``).
Behind API_KEY like every route, unless METRICS_PUBLIC opens it for a scraper."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

METRICS_PATH = "/metrics"

router = APIRouter(tags=["operating"])


@router.get(METRICS_PATH, response_class=Response)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
