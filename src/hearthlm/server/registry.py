"""Which models a server serves, and the one a request names. (Being extended to every model in the store:
loaded on first use, unloaded after keep_alive or under a memory budget.)"""

from __future__ import annotations

from fastapi import Request

from .generation import ServedModel


async def served(request: Request, name: str | None, keep_alive=None) -> ServedModel:
    """The model that `name` names, loaded if need be (awaits a model still loading); APIError 404 for a name
    this server cannot serve. `keep_alive`: Ollama's field (seconds, a duration string, or negative: forever)."""
    model: ServedModel = request.app.state.model
    model.check_name(name)
    return model
