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
