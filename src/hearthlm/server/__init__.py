"""`hearth serve`: one model behind the OpenAI and Ollama HTTP APIs (FastAPI + uvicorn), all work through the
AsyncEngine. `create_app` builds the app for a ServedModel; `serve` loads a model and runs uvicorn."""

from __future__ import annotations

from pathlib import Path

# 11434 is Ollama's port: Ollama clients and tools find the server with no setting, while OpenAI clients name a
# base_url in any case.
DEFAULT_PORT = 11434


def model_name(model: str | None, path: Path) -> str:
    """The name the APIs list: the model as the user named it (an HF id stays whole), a path's last part, or the
    demo model's folder name."""
    if model is None or Path(model).expanduser().exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return model


def load(model: str | None = None, dtype: str | None = None, quant: str | None = None, max_batch: int = 16,
         kv_blocks: int | None = None, expert_budget: str | None = None, moe_profile: bool = True):  # fmt: skip
    """Load `model` and start its engine; returns the ServedModel the app serves."""
    from ..api import LLM
    from ..engine.async_engine import AsyncEngine
    from ..engine.engine import Engine
    from .generation import ServedModel
    from .metrics import Metrics

    llm = LLM(model, dtype=dtype, quant=quant, expert_budget=expert_budget, moe_profile=moe_profile)
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer.json: the server needs one to read text")
    engine = AsyncEngine(Engine(llm, max_batch=max_batch, kv_blocks=kv_blocks))
    return ServedModel(llm, engine, model_name(model, llm.path), Metrics())


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None,
          dtype: str | None = None, quant: str | None = None, max_batch: int = 16, kv_blocks: int | None = None,
          log_level: str = "info", expert_budget: str | None = None, moe_profile: bool = True) -> None:  # fmt: skip
    """Serve `model` (None: the built-in demo) until interrupted."""
    import uvicorn
    from rich.console import Console

    from .app import create_app

    served = load(model, dtype, quant, max_batch, kv_blocks, expert_budget, moe_profile)
    url = f"http://{host}:{port}"
    key = "; send 'Authorization: Bearer KEY'" if api_key else ""
    Console(stderr=True, highlight=False).print(
        f"serving {served.name}: OpenAI base_url {url}/v1, Ollama host {url}, metrics {url}/metrics{key}"
    )
    uvicorn.run(create_app(served, api_key), host=host, port=port, log_level=log_level)
