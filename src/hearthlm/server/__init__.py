"""`hearth serve`: one model behind the OpenAI and Ollama HTTP APIs (FastAPI + uvicorn), all work through the
AsyncEngine. `create_app` builds the app for a ServedModel; `serve` loads a model, runs uvicorn on a thread and
the engine on the main thread."""

from __future__ import annotations

import signal
import threading
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
         kv_blocks: int | None = None, expert_budget: str | None = None, moe_profile: bool = True,
         background: bool = True):  # fmt: skip
    """Load `model` and start its engine (`background=False`: the caller runs `engine.run()`); returns the
    ServedModel the app serves."""
    from ..api import LLM
    from ..engine.async_engine import AsyncEngine
    from ..engine.engine import Engine
    from .generation import ServedModel
    from .metrics import Metrics

    llm = LLM(model, dtype=dtype, quant=quant, expert_budget=expert_budget, moe_profile=moe_profile)
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer.json: the server needs one to read text")
    engine = AsyncEngine(Engine(llm, max_batch=max_batch, kv_blocks=kv_blocks), background=background)
    return ServedModel(llm, engine, model_name(model, llm.path), Metrics())


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None,
          dtype: str | None = None, quant: str | None = None, max_batch: int = 16, kv_blocks: int | None = None,
          log_level: str = "info", expert_budget: str | None = None, moe_profile: bool = True) -> None:  # fmt: skip
    """Serve `model` (None: the built-in demo) until interrupted."""
    import uvicorn
    from rich.console import Console

    from .app import create_app

    served = load(model, dtype, quant, max_batch, kv_blocks, expert_budget, moe_profile, background=False)
    url = f"http://{host}:{port}"
    key = "; send 'Authorization: Bearer KEY'" if api_key else ""
    Console(stderr=True, highlight=False).print(
        f"serving {served.name}: OpenAI base_url {url}/v1, Ollama host {url}, metrics {url}/metrics{key}"
    )
    # HTTP on a thread of its own, the engine on the main thread (see engine/async_engine.py for why).
    server = uvicorn.Server(uvicorn.Config(create_app(served, api_key), host=host, port=port, log_level=log_level))

    def http() -> None:
        try:
            server.run()
        finally:  # stopped, or never started (a port in use): the engine loop ends with it
            served.engine.shutdown()

    def stop(signum, frame) -> None:  # uvicorn installs no handlers off the main thread: SIGTERM ends as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    thread = threading.Thread(target=http, name="hearthlm-http")
    thread.start()
    try:
        served.engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join()
    if not server.started:
        raise SystemExit(f"hearth serve: could not start the HTTP server on {host}:{port} (see the error above)")
