"""``python -m src.web``: serve the API on API_HOST:API_PORT from the settings (.env too).

Same app as ``uvicorn src.web.api:app``; this entry just reads the host and port the way the
rest of the project reads its settings.
"""

import sys

import uvicorn

from src.config import load_settings
from src.errors import ConfigError

if __name__ == "__main__":
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.exit(f"Error: {exc}")
    uvicorn.run("src.web.api:app", host=settings.api_host, port=settings.api_port)
