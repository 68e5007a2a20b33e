"""The web page and JSON API of ``camretrieval serve`` (FastAPI + uvicorn), in :mod:`camretrieval.web.server`;
its static files (page, script, style) are under ``web/static/``. docs/web.md documents it."""

from camretrieval.web.server import create_app, serve

__all__ = ["create_app", "serve"]
