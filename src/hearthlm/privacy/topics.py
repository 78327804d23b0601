"""Labelled prompts for the audit: the default set shipped beside this file (no network), or a JSON file of the
same shape, {"topics": {name: [prompt, ...], ...}}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT = Path(__file__).with_name("topics.json")


@dataclass(frozen=True)
class Prompt:
    text: str
    label: int  # index into the topic names


def load(path: str | Path | None = None, per_topic: int | None = None) -> tuple[list[str], list[Prompt]]:
    """(topic names, prompts in round-robin order over the topics); `per_topic`: keep the first n of each."""
    path = Path(path) if path is not None else DEFAULT
    try:
        topics = json.loads(path.read_text())["topics"]
        ok = isinstance(topics, dict) and all(isinstance(v, list) for v in topics.values())
    except (OSError, ValueError, KeyError, TypeError) as e:
        topics, ok, why = None, False, str(e)
    else:
        why = "wrong shape"
    if not ok:
        raise ValueError(f'{path}: not a topic file ({why}): want {{"topics": {{name: [prompt, ...]}}}}')
    if len(topics) < 2:
        raise ValueError(f"{path}: an audit needs at least two topics, found {len(topics)}")
    names = sorted(topics)
    lists = [[str(t) for t in topics[n]][:per_topic] for n in names]
    if min(len(x) for x in lists) < 2:
        raise ValueError(f"{path}: every topic needs at least two prompts")
    # Interleaved, so that the order of the runs (a warm cache, drift) cannot stand in for the label.
    prompts = [Prompt(x[i], c) for i in range(max(map(len, lists))) for c, x in enumerate(lists) if i < len(x)]
    return names, prompts
