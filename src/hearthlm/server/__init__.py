"""`hearth serve`: the models of the store (or one pinned model) behind the OpenAI, Ollama and Anthropic HTTP
APIs (FastAPI + uvicorn), all work through the AsyncEngines. `create_app` builds the app; `serve` runs uvicorn on
a thread and steps every loaded model's engine on the main thread."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

# 11434 is Ollama's port: Ollama clients and tools find the server with no setting, while OpenAI clients name a
# base_url in any case.
DEFAULT_PORT = 11434
GRACE = 10.0  # seconds a stopping server lets open requests finish; then it cancels them (their engine work too)


def model_name(model: str | None, path: Path) -> str:
    """The name the APIs list: the model as the user named it (an HF id stays whole), a path's last part, or the
    demo model's folder name."""
    if model is None or Path(model).expanduser().exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return model


def load(model: str | None = None, dtype: str | None = None, quant: str | None = None,
         max_running: int | None = None, kv_blocks: int | None = None, expert_budget: str | None = None,
         moe_profile: bool = True, background: bool = True, stepper=None, name: str | None = None, metrics=None,
         image_tokens: int | None = None, draft: str | None = None, device: str | None = None,
         privacy=None, quant_towers: bool = False, mesh=None):  # fmt: skip
    """Load `model` and start its engine (`background=False`: the caller runs `engine.run()`; `stepper`: the
    thread shared with other models' engines); returns the ServedModel the app serves, listed as `name`.
    `image_tokens`: the default soft-token budget per image; `draft`: speculative decoding ("lookup" or None),
    which a request's `speculative` field overrides; `device`: cpu or cuda[:N] (default: HEARTHLM_DEVICE, else cpu);
    `privacy`: the routing-privacy switches (moe/options.PrivacyOptions); `quant_towers`: quantize its image / audio
    towers too (LLM's quant_towers); `mesh`: rank 0 of a tensor-parallel group (distributed/mesh.py), whose engine's
    forwards the other ranks follow (distributed/follow.py)."""
    from rich.console import Console

    from ..api import LLM
    from ..engine.async_engine import AsyncEngine
    from ..engine.engine import Engine
    from .generation import ServedModel
    from .metrics import Metrics

    if mesh is not None:
        device = str(mesh.device(device))
    llm = LLM(model, dtype=dtype, device=device, quant=quant, expert_budget=expert_budget, moe_profile=moe_profile,
              draft=draft, privacy=privacy, quant_towers=quant_towers, mesh=mesh)  # fmt: skip
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer.json: the server needs one to read text")
    if llm.privacy_note:
        Console(stderr=True, highlight=False).print(f"{name or model_name(model, llm.path)}: {llm.privacy_note}")
    core = Engine(llm, max_running=max_running, kv_blocks=kv_blocks)
    leader = None
    if mesh is not None:
        from ..distributed.follow import lead

        leader = lead(core)
    engine = AsyncEngine(core, background, stepper)
    served = ServedModel(llm, engine, name or model_name(model, llm.path), metrics or Metrics())
    served.image_tokens = image_tokens
    served.leader = leader
    return served


def memory_budget(max_memory: str | None) -> int:
    """Bytes that loaded models may hold together: `max_memory` ("12GB", "800MB"), else what `hearth fit` says
    this machine holds (its GPU's memory when it has one, else its RAM)."""
    from ..moe.budget import parse_bytes

    if max_memory is not None:
        return parse_bytes(max_memory, "--max-memory")
    from ..fit import detect

    machine = detect(measure=False)
    return machine.vram or machine.ram


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None,
          dtype: str | None = None, quant: str | None = None, max_running: int | None = None,
          kv_blocks: int | None = None, log_level: str = "info", expert_budget: str | None = None,
          moe_profile: bool = True, keep_alive: str | None = None, max_memory: str | None = None,
          allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None,
          image_tokens: int | None = None, draft: str | None = None, device: str | None = None,
          privacy=None, quant_towers: bool = False, mesh=None) -> None:  # fmt: skip
    """Serve `model`, pinned, or (None) every model in the store, each loaded on first use, until interrupted.
    Bound to a loopback address, it answers requests addressed to loopback names and `allowed_hosts` only (DNS
    rebinding); bound elsewhere, any Host unless `allowed_hosts` names them. `cors_origins`: web origins allowed to
    call it from a browser. `quant_towers`: quantize the towers of the models that have them (a pinned model without
    towers is refused). `mesh`: serve as rank 0 of `hearth serve MODEL --tp N` (distributed/follow.py). SIGTERM or
    Ctrl-C: open requests get GRACE seconds to finish; a second one stops now."""
    import uvicorn
    from rich.console import Console

    from ..engine.async_engine import Stepper
    from ..store import towers as store_towers
    from .app import create_app
    from .guard import LOOPBACK_NAMES, is_loopback
    from .metrics import Metrics
    from .registry import DEFAULT_KEEP_ALIVE, Models, keep_alive_seconds

    stepper, metrics = Stepper(), Metrics()
    options = dict(dtype=dtype, quant=quant, max_running=max_running, kv_blocks=kv_blocks, expert_budget=expert_budget,
                   moe_profile=moe_profile, stepper=stepper, metrics=metrics, image_tokens=image_tokens,
                   draft=draft, device=device, privacy=privacy)  # fmt: skip
    if model is not None:
        served = Models(pinned=load(model, quant_towers=quant_towers, mesh=mesh, **options))
        what = served.pinned.name + (f" over {mesh.world} ranks" if mesh is not None else "")
    else:
        wait = keep_alive_seconds(keep_alive)
        # models with no towers of their own to quantize (text-only, GGUF + mmproj) load as they are
        towers = lambda path: quant_towers and path.suffix != ".gguf" and bool(store_towers(path)[0])  # noqa: E731
        served = Models(lambda path, name: load(str(path), name=name, quant_towers=towers(path), **options),
                        budget=memory_budget(max_memory),
                        keep_alive=DEFAULT_KEEP_ALIVE if wait is None else wait)  # fmt: skip
        what = f"{len(served.servable())} models (each loads on first use; `hearth list` shows them)"
    url = f"http://{host}:{port}"
    key = "; send 'Authorization: Bearer KEY'" if api_key else ""
    Console(stderr=True, highlight=False).print(
        f"serving {what}: OpenAI base_url {url}/v1, Ollama host {url}, Anthropic base_url {url}, "
        f"metrics {url}/metrics{key}"
    )
    # HTTP on a thread of its own, the engines on the main thread (see engine/async_engine.py for why).
    hosts = [*LOOPBACK_NAMES, *(allowed_hosts or [])] if is_loopback(host) or allowed_hosts else None
    app = create_app(served, api_key, metrics, hosts=hosts, cors_origins=cors_origins or ())
    # uvicorn's own limit is a backstop: at GRACE the engines stop, and open streams end with an error event.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACE + 30)
    server = uvicorn.Server(config)
    ending = threading.Timer(GRACE, served.shutdown)
    ending.daemon = True

    def http() -> None:
        try:
            server.run()
        finally:  # stopped, or never started (a port in use): the engine loop ends with it
            stepper.stop()

    def stop(signum, frame) -> None:  # uvicorn installs no handlers off the main thread: these are ours
        if server.should_exit:  # the second signal: stop now
            raise KeyboardInterrupt
        server.should_exit = True  # no new connections; open requests finish (GRACE), then the engines stop
        ending.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    thread = threading.Thread(target=http, name="hearthlm-http")
    thread.start()
    try:
        stepper.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join()
        ending.cancel()
        served.shutdown()
        if mesh is not None:
            served.pinned.leader.stop()
    if not server.started:
        raise SystemExit(f"hearth serve: could not start the HTTP server on {host}:{port} (see the error above)")
