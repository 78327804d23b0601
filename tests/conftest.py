from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build, save  # noqa: E402


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
