"""A rank of --tp / --ep reads only its own share of the checkpoint. The worker maps the file with every page that
lies wholly outside the rank's share made unreadable (PROT_NONE), so reading a byte of another rank's rows,
columns or experts kills it; it must load, and keep exactly what splitting a whole load keeps.

The shares are written out here from the split's definition (heads, MLP width, vocabulary, experts), not taken
from the code under test. The checkpoints are built so that the shares fall on whole pages: float32, a hidden
size of 1024 (a norm fills a page), and column halves of 1024 (a row's half of o_proj or down is one page); the
header is padded (with spaces, as the safetensors format allows) so that the data starts on a page."""

from __future__ import annotations

import json
import mmap
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from hearthlm import LLM
from hearthlm.distributed.mesh import Mesh
from hearthlm.distributed.tensor_parallel import shard_model

PAGE = mmap.PAGESIZE
WORKER = Path(__file__).with_name("share_worker.py")
# 4 query heads of 512 over 2 K/V heads, an MLP (and experts) of 2048, a vocabulary of 256: rank 1 of 2 keeps the
# second half of each.
SIZES = dict(vocab_size=256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=512, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


def rows(spans):
    """Byte ranges of output rows `spans` of a [R, C] float32 matrix stored at `at`."""
    return lambda shape, at=0: [(at + a * shape[-1] * 4, at + b * shape[-1] * 4) for a, b in spans]


def cols(c0, c1):
    return lambda shape, at=0: [
        (at + (r * shape[-1] + c0) * 4, at + (r * shape[-1] + c1) * 4) for r in range(shape[-2])
    ]


def nothing(shape, at=0):
    return []


# Rank 1 of 2's share of each split tensor (by the end of its name); every other tensor is read whole.
ATTENTION = {"q_proj.weight": rows([(1024, 2048)]), "k_proj.weight": rows([(512, 1024)]),
             "v_proj.weight": rows([(512, 1024)]), "o_proj.weight": cols(1024, 2048),
             "embed_tokens.weight": rows([(128, 256)]), "lm_head.weight": rows([(128, 256)])}  # fmt: skip
DENSE = {"gate_proj.weight": rows([(1024, 2048)]), "up_proj.weight": rows([(1024, 2048)]),
         "down_proj.weight": cols(1024, 2048)}  # fmt: skip
# Mixtral's experts are stored one by one (w1: gate, w3: up, w2: down): each one's width split ("tp"), or expert 1 of
# 2 whole and nothing of expert 0 ("ep").
EXPERTS = {
    "tp": {"w1.weight": rows([(1024, 2048)]), "w3.weight": rows([(1024, 2048)]), "w2.weight": cols(1024, 2048)},
    "ep": {f"experts.0.{w}.weight": nothing for w in ("w1", "w2", "w3")},
}


def pad_header(file: Path) -> None:
    """Rewrite a safetensors file with its header padded so that the tensor data starts on a page."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].rstrip(b" ")
    size = -(-(8 + len(header)) // PAGE) * PAGE - 8
    file.write_bytes(struct.pack("<Q", size) + header.ljust(size, b" ") + raw[8 + n :])


def forbidden(file: Path, shares: dict) -> tuple[list[list[int]], int]:
    """The page ranges of `file` that lie wholly outside what the rank may read, and the data's size."""
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    header = json.loads(file.read_bytes()[8 : 8 + n])
    header.pop("__metadata__", None)
    allowed, data = [], 8 + n
    assert data % PAGE == 0
    for name, entry in header.items():
        start, end = (data + o for o in entry["data_offsets"])
        part = next((p for suffix, p in shares.items() if name.endswith(suffix)), None)
        allowed += [(start, end)] if part is None else part(entry["shape"], start)
    allowed.sort()
    pages, at = [], data
    for a, b in allowed + [(file.stat().st_size, file.stat().st_size)]:
        first, last = -(-at // PAGE) * PAGE, a // PAGE * PAGE
        if last > first:
            pages.append([first, last])
        at = max(at, b)
    return pages, file.stat().st_size - data


def run(folder: Path, pages: Path, rank: int, split: str, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(WORKER), str(folder), str(pages), str(rank), "2", split, str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def build(tmp: Path, family: str) -> Path:
    torch.manual_seed(0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES))
    else:
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**SIZES, num_local_experts=2, num_experts_per_tok=1))
    model.save_pretrained(tmp)
    pad_header(tmp / "model.safetensors")
    return tmp


@pytest.mark.parametrize(("family", "split"), [("llama", "tp"), ("mixtral", "tp"), ("mixtral", "ep")])
def test_a_rank_reads_only_its_share(family, split, tmp_path):
    folder = build(tmp_path / "model", family)
    shares = ATTENTION | (DENSE if family == "llama" else EXPERTS[split])
    pages, size = forbidden(folder / "model.safetensors", shares)
    assert sum(b - a for a, b in pages) > 0.4 * size  # most of the file is the other rank's
    (tmp_path / "pages.json").write_text(json.dumps({"model.safetensors": pages}))

    if family == "llama":  # once (the protection is the same for every case)
        whole = run(folder, tmp_path / "pages.json", -1, split, tmp_path / "whole.pt")
        assert whole.returncode == -11, "the protection must stop a load that reads everything"
    mine = run(folder, tmp_path / "pages.json", 1, split, tmp_path / "rank.pt")
    assert mine.returncode == 0, mine.stderr[-3000:]

    kept = torch.load(tmp_path / "rank.pt")
    want = shard_model(LLM(folder, dtype="float32").model, Mesh(1, 2, split=split)).state_dict()
    assert kept.keys() == want.keys() and all(torch.equal(kept[k], want[k]) for k in want)
