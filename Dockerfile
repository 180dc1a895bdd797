# Mini-Claude on CPU: the API (OpenAI-compatible routes, sessions, the web UI at /ui) serving
# the bundled SmolLM2-135M-Instruct, which is converted at build time, so the container needs
# no network at run time.
#
#   docker build -t mini-claude .
#   docker run --rm -p 8000:8000 -v mini-claude-data:/app/data mini-claude
#   curl localhost:8000/health        # then open http://localhost:8000/ui
#
# Any setting of the README's "Configuration" table can be passed with -e, e.g.
# -e API_KEY=s3cret (do set one before exposing the port beyond your machine).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False

WORKDIR /app

# Dependencies first, so that code changes do not reinstall them. The CPU index gives torch's
# CPU wheel (about 200 MB) instead of the multi-GB CUDA build from PyPI.
COPY requirements.txt requirements-assets.txt ./
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt \
    && pip install --no-deps -r requirements-assets.txt

COPY src/ src/
COPY scripts/ scripts/
COPY configs/ configs/

# Our C kernels (src/models/native.py: the int4 products, RMSNorm) are compiled once: build
# them now, then drop the compiler. The int4 ones run where the CPU has AVX-512 BF16 or
# AVX2 + FMA; elsewhere PyTorch's kernel serves.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && MODEL_CACHE_DIR=/app/models python -m src.models.native \
    && apt-get purge -y gcc libc6-dev && rm -rf /var/lib/apt/lists/*

# A user without root rights owns the model cache (the prepared-weights cache is written on
# first start) and the sessions database.
RUN useradd --create-home --uid 1000 mini \
    && mkdir -p /app/models /app/data /app/outputs/adapters \
    && chown -R mini /app
USER mini

ENV MODEL_NAME=smollm2-135m-instruct \
    MODEL_CACHE_DIR=/app/models \
    DATA_DIR=/app/data \
    ADAPTERS_DIR=/app/outputs/adapters

# Convert the bundled GGUF file into a safetensors folder once, now, not at every start.
RUN python scripts/download_models.py --model smollm2-135m-instruct

VOLUME ["/app/data"]
EXPOSE 8000

# /health answers 503 while the model loads and 200 once it is ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# GuardedH11Protocol: header size, connection timeouts and connections per client (README).
# `docker stop` sends SIGTERM and kills 10 s later: SHUTDOWN_GRACE_SECONDS (8) fits in it.
CMD ["uvicorn", "src.web.api:app", "--host", "0.0.0.0", "--port", "8000", \
     "--http", "src.web.server:GuardedH11Protocol"]
