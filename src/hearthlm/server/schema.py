"""The OpenAPI document the server serves at /openapi.json: FastAPI's, built from the routes' request models, with
the names of the models this server serves as an enum wherever a request names one (so that a client generated
from it, or a fuzzer, names a model that exists)."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from .registry import Models

# Request fields that name a served model; a pull names a Hub repo, a copy's destination a new name: no enum there.
_MODEL_FIELDS = ("model", "source")
_FREE = {"PullRequest"}


def document(app: FastAPI, models: Models) -> dict[str, Any]:
    """The OpenAPI document of `app` with the servable names of `models`; rebuilt only when the names change."""
    names = tuple(sorted({name for name, _ in models.servable()}))
    cached = getattr(app.state, "openapi_document", None)
    if cached is not None and cached[0] == names:
        return cached[1]
    doc = copy.deepcopy(app.openapi())  # FastAPI builds it once and keeps it
    for schema in doc.get("components", {}).get("schemas", {}).values():
        if schema.get("title") in _FREE:
            continue
        for field in _MODEL_FIELDS:
            if field in schema.get("properties", {}):
                _name_models(schema["properties"][field], names)
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            for param in op.get("parameters", []) if isinstance(op, dict) else []:
                if path.startswith("/v1/models/") and param.get("name") == "name":
                    _name_models(param["schema"], names)
    app.state.openapi_document = (names, doc)
    return doc


def _name_models(prop: dict[str, Any], names: tuple[str, ...]) -> None:
    """Add the enum to the string form of a field (the string branch of an optional one)."""
    if prop.get("type") == "string":
        prop["enum"] = list(names)
        return
    for branch in prop.get("anyOf", []):
        if branch.get("type") == "string":
            branch["enum"] = list(names)
