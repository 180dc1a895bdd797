"""``python -m src.web``: serve the API on API_HOST:API_PORT from the settings (.env too).

Same app as ``uvicorn src.web.api:app``, served with the connection limits of
``src/web/server.py`` (header size, timeouts, connections per client).
"""

import sys

from src.config import load_settings
from src.errors import ConfigError
from src.web.server import serve

if __name__ == "__main__":
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.exit(f"Error: {exc}")
    serve(settings)
