"""Tensor, expert and pipeline parallelism on this machine: prefill and decode tokens/s at 1 rank and at 2 ranks
of each kind (gloo, CPU), and the bytes the ranks exchange per token next to the bytes of weights each rank reads
per token.

    python benchmarks/parallel.py [--hidden 1024 --layers 8 --prompt 256 --decode 64] [--experts 8] [--link 1gbit]

Builds a random Llama-shaped checkpoint (float32; with --experts E, Mixtral-shaped: E experts, top-2) in a
temporary folder, then runs the same measurement as one process and as 2 ranks (hearthlm.distributed.run.launch):
--tp 2 and --pp 2, and for experts also --ep 2. On a machine with 2 cores the 2 ranks share them (one thread
each), so this shows the cost of the exchanges, not scaling.

--link RATE limits the loopback interface to RATE (`tc qdisc ... tbf`, root only) while the ranks run: the ranks
then talk over a link as slow as Ethernet between two hosts (its bandwidth; loopback keeps its latency of
microseconds), which is where pipeline parallelism should beat tensor parallelism. The limit is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TOP_K = 2  # experts per token in the Mixtral-shaped model


def build(folder: Path, hidden: int, layers: int, experts: int) -> None:
    import transformers as tf

    shape = dict(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    if experts:
        cfg = tf.MixtralConfig(**shape, num_local_experts=experts, num_experts_per_tok=TOP_K)
        tf.MixtralForCausalLM(cfg).save_pretrained(folder)
    else:
        tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).save_pretrained(folder)


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss, which keeps the peak of the process
    that forked this one across exec (here: the benchmark, which built the checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(folder: str, prompt: int, decode: int, split: str) -> None:
    """One rank's part (or the single process): prefill and decode timings, printed as JSON by rank 0."""
    from hearthlm import LLM, SamplingParams
    from hearthlm.distributed import mesh as meshes

    mesh = meshes.init(split=split) if meshes.launched() else meshes.Mesh(0, 1)
    llm = LLM(folder, dtype="float32", mesh=mesh if mesh.world > 1 else None)
    load_peak = _peak_mib()
    ids = [(i * 7919) % 31000 + 100 for i in range(prompt)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=decode + 1, temperature=0.0, ignore_eos=True)
    llm.engine(prefix_caching=False)  # the second run computes its prompt again instead of finding it cached
    warm = [t + 1 for t in ids]  # warm up at full length: the cache's blocks are touched (zeroed) once here
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    llm.generate(ids, one)
    t1 = time.perf_counter()
    llm.generate(ids, many)
    t2 = time.perf_counter()
    if mesh.first:
        prefill_s, total_s = t1 - t0, t2 - t1
        decode_s = max(total_s - prefill_s, 1e-9)
        tps = {"prefill_tps": prompt / prefill_s, "decode_tps": decode / decode_s}
        tps["rank0_load_peak_mib"] = round(load_peak)
        print(json.dumps({"ranks": mesh.world, "split": split if mesh.world > 1 else None, **tps}))
    meshes.close()


def traffic(hidden: int, layers: int, vocab: int, world: int, split: str, experts: int) -> dict[str, float]:
    """Bytes per token (float32): what each rank sends into the collectives, and what it reads of the weights
    (for experts, the top-2 an average token picks: a rank of --ep reads the picked experts it holds, on average
    the same 1/world as a rank of --tp, which reads a slice of each). --pp: one hidden vector per cut between
    stages, and the last stage's broadcast of the final one (counted for the whole group, not per rank); each rank
    reads its layers and the whole LM head."""
    reduce = (2 * layers + 1) * hidden * 8  # o_proj and down per layer, and the embedding, summed in float64
    gather = vocab // world * 4 * (world - 1)  # the other ranks' logits
    inter = hidden * 11 // 4 // 64 * 64
    kv = max(1, hidden // 256) * 64
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * inter * (TOP_K if experts else 1)
    if split == "pp":
        return {
            "exchanged": 2 * (world - 1) * hidden * 4,
            "weights_read": (layers * per_layer / world + vocab * hidden) * 4,
        }
    weights = (layers * per_layer + vocab * hidden) * 4 / world  # tied-free Llama: head read per token
    # A ring all-reduce moves 2 (N - 1) / N of the tensor per rank.
    return {"exchanged": reduce * 2 * (world - 1) / world + gather, "weights_read": weights}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--experts", type=int, default=0, help="a Mixtral-shaped model with this many experts (top-2)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # a rank's part
    p.add_argument("--split", default="tp", help=argparse.SUPPRESS)  # a rank's part: tp, ep or pp
    p.add_argument("--link", default=None, help="limit loopback to this rate while ranks run, e.g. 1gbit (root)")
    a = p.parse_args()
    if a.measure:
        return measure(a.measure, a.prompt, a.decode, a.split)
    with limited_link(a.link):
        run(a)


@contextlib.contextmanager
def limited_link(rate: str | None):
    """Loopback limited to `rate` by a token bucket (its burst above loopback's 64 kB packets), then restored."""
    if rate is None:
        yield
        return
    tbf = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
    done = subprocess.run(tbf, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: --link needs `tc` and root to limit loopback: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def run(a: argparse.Namespace) -> None:
    from hearthlm.distributed.run import launch

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), a.hidden, a.layers, a.experts)
        cmd = [sys.executable, __file__, "--measure", tmp, "--prompt", str(a.prompt), "--decode", str(a.decode)]
        shape = f"Mixtral-shaped, {a.experts} experts top-{TOP_K}" if a.experts else "Llama-shaped"
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"# {shape}, hidden {a.hidden}, {a.layers} layers, vocab 32000, fp32; {' '.join(sys.argv)}")
        if a.link:
            print(f"# loopback limited to {a.link} (tc tbf) while the ranks ran")
        runs = [(1, "tp"), (2, "tp"), (2, "pp")] + [(2, "ep")] * bool(a.experts)
        for world, split in runs:
            if world == 1:
                os.environ.setdefault("HEARTHLM_THREADS", str(os.cpu_count()))
            launch(world, [*cmd, "--split", split])
            t = traffic(a.hidden, a.layers, 32000, world, split, a.experts)
            per = "per token, all ranks" if split == "pp" else "per token per rank"
            print(f"# {world} rank(s) --{split}: {t['exchanged'] / 1e3:.1f} kB exchanged {per}, "
                  f"{t['weights_read'] / 1e6:.1f} MB of weights read per token per rank")  # fmt: skip


if __name__ == "__main__":
    main()
