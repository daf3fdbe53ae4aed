"""`lcrun serve`: an OpenAI-compatible HTTP server over one loaded model (docs/serve.md)."""
from lcrun.serve.app import ServeSettings, create_app
from lcrun.serve.schemas import APIError

__all__ = ["APIError", "ServeSettings", "create_app"]
