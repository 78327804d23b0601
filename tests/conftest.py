from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build, save  # noqa: E402

from hearthlm import LLM  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (transformers model, saved folder); built once per session."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            model, _ = build(name)
            made[name] = (model, save(model, tmp_path_factory.mktemp(name)))
        return made[name]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """loaded(name) -> (transformers model, hearthlm LLM in float32), loaded once per test module (a module's
    tests may reconfigure the LLM's engine)."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            ref, folder = checkpoint(name)
            made[name] = (ref, LLM(folder, dtype="float32"))
        return made[name]

    return get


@pytest.fixture
def kernel_path(monkeypatch):
    """kernel_path(name) runs the rest of the test on CPU kernel path `name` ("amx", "avx512", "avx2" or "torch",
    as HEARTHLM_ISA sets it); skips the test where this CPU cannot run it. The choice is forgotten afterwards."""
    from hearthlm.kernels import cpu

    def use(name: str) -> None:
        cpu.isa.cache_clear()
        cpu.available()  # built (once) for the CPU's own path: under a "torch" cap the process keeps its GEMVs
        cpu.isa.cache_clear()
        gemm = name in ("amx", "avx512")
        if cpu.ISAS.index(name) < cpu.ISAS.index(cpu.isa()) or (gemm and not cpu.avx512_gemm_available()):
            pytest.skip(f"this CPU has no {name} kernel path")
        monkeypatch.setenv("HEARTHLM_ISA", name)
        cpu.isa.cache_clear()

    yield use
    monkeypatch.delenv("HEARTHLM_ISA", raising=False)
    cpu.isa.cache_clear()


# -- the server on the real engine and the demo model, one per test module -----------------------------------
@pytest.fixture(scope="module")
def served():
    from hearthlm.server import load

    return load(None)


@pytest.fixture(scope="module")
def server(served):
    from serving import LiveServer, idle

    from hearthlm.server.app import create_app

    s = LiveServer(create_app(served))
    yield s
    idle(served)  # every request has ended and every KV block is free after the module's tests
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
