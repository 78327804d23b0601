"""Router noise's trade: attacker A4's accuracy against the quality it costs, for several noise scales.

A4 sees the routing of each prompt's tokens (one forward pass over the chat-formatted prompt); quality is
measured on held-out text against the same model without noise: mean KL divergence of the next-token
distributions, top-1 agreement and perplexity, as benchmarks/quality.py measures weight formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..moe.noise import RouterNoise
from . import observers, topics
from .classify import Score, cross_validate
from .victim import RoutingRecorder


@dataclass
class Point:
    scale: float
    score: Score
    kl: float  # nats per token, noisy against clean
    top1: float  # share of positions whose argmax agrees
    ppl: float
    ppl_clean: float


def routing_rows(llm, prompts: list[topics.Prompt]) -> np.ndarray:
    """A4's features for each prompt: per-layer expert shares over its tokens."""
    rows = []
    for p in prompts:
        ids = llm.tokenizer.encode_chat(llm.tokenizer.apply_chat_template([{"role": "user", "content": p.text}]))
        recorder = RoutingRecorder(llm.model)
        llm.logits(ids)
        rows.append(observers.a4_features(recorder.close()))
    return np.stack(rows)


def quality(clean: torch.Tensor, noisy: torch.Tensor, ids: list[int]) -> tuple[float, float, float, float]:
    """(KL, top-1 agreement, perplexity noisy, perplexity clean) of [T, V] logits predicting ids[1:]."""
    lp, lq = clean[:-1].log_softmax(-1), noisy[:-1].log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (clean[:-1].argmax(-1) == noisy[:-1].argmax(-1)).float().mean().item()
    target = torch.tensor(ids[1:])
    ppl = [float(torch.exp(-lg.gather(-1, target[:, None]).mean())) for lg in (lq, lp)]
    return kl, top1, ppl[0], ppl[1]


def noise_curve(llm, scales: list[float], text: str, topic_file=None, per_topic=None, window: int = 512) -> list[Point]:
    """A4 accuracy and quality cost at each router noise scale (0: the model as it is)."""
    _, prompts = topics.load(topic_file, per_topic)
    labels = np.array([p.label for p in prompts])
    ids = llm.tokenizer.encode(text)[:window]
    clean = llm.logits(ids)
    points = []
    for scale in scales:
        noise = RouterNoise(llm.model, scale, seed=0) if scale else None
        try:
            score = cross_validate(routing_rows(llm, prompts), labels)
            noisy = llm.logits(ids) if noise else clean
        finally:
            if noise:
                noise.close()
        points.append(Point(scale, score, *quality(clean, noisy, ids)))
    return points
