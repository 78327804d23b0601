"""`hearth serve MODEL --tp 2`: 2 gloo ranks on this machine, rank 0 serving HTTP and the other following its
engine (distributed/follow.py), answer what one process answers (greedy, several requests at once, streamed and
not), on the demo model (Gemma 4: sliding windows, KV-shared layers, PLE, chat template) and a tiny Llama; what
cannot be mirrored is refused with a clear error; SIGTERM stops every rank; a killed follower ends the server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import torch
from checkpoints import VOCAB
from serving import LiveServer
from tokenizers import Tokenizer, models, pre_tokenizers

from hearthlm import LLM
from hearthlm.cli import main
from hearthlm.distributed.follow import Forward, Leader, Stop, follow
from hearthlm.engine.engine import Engine
from hearthlm.engine.sampler import SamplingParams

SAFETY = 180  # seconds: a net for a hung child on a loaded machine, never an expectation of speed
CHATS = ["Tell me a story.", "What is the sea?", "Name a colour.", "Who are you?"]
WORDS = ["w5 w17 w33 w8", "w40 w41", "w9 w9 w9 w9 w9 w70", "w3"]
FP32 = ["--dtype", "float32"]  # bf16 partial sums, added by an all-reduce, round otherwise than one matmul


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """`hearth serve MODEL --tp 2` as a child process on a free loopback port."""

    def __init__(self, model: str, log: Path, torchrun: bool = False, split: str = "--tp", extra: tuple = ()):
        self.port = _port()
        cmd = [sys.executable, "-m", "hearthlm.cli", "serve", model, split, "2", "--port", str(self.port), *FP32]
        cmd += extra
        if torchrun:
            run = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(_port()),
            ]
            cmd = [*run, *cmd[1:5], *cmd[7:]]  # without --tp: torchrun starts the ranks
        self.log = log
        with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + SAFETY
        while not self._up():
            assert self.proc.poll() is None, f"the ranks ended early: {self.err()}"
            assert time.monotonic() < deadline, "the ranks never served"
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def rank(self, rank: int = 1) -> int:
        """The pid of a rank (a child of the launcher whose environment says RANK=rank)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != self.proc.pid:
                    continue
                if f"\0RANK={rank}\0".encode() in b"\0" + (stat.parent / "environ").read_bytes():
                    return int(stat.parent.name)
            except (OSError, ValueError):
                continue
        raise AssertionError(f"no rank {rank} among the launcher's children")

    def err(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=SAFETY)


@pytest.fixture(scope="module")
def demo_tp(tmp_path_factory):
    ranks = Ranks("hearth-demo", tmp_path_factory.mktemp("demo_tp") / "err.log")
    yield ranks
    ranks.stop()


@pytest.fixture(scope="module")
def words(checkpoint, tmp_path_factory) -> Path:
    """The tiny Llama checkpoint with a word-level tokenizer (w3 ... w95), so that a server can read text."""
    dst = tmp_path_factory.mktemp("serve_tp") / "llama"
    shutil.copytree(checkpoint("llama")[1], dst)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    return dst


@pytest.fixture(scope="module")
def llama_tp(words, tmp_path_factory):
    ranks = Ranks(str(words), tmp_path_factory.mktemp("llama_tp") / "err.log")
    yield ranks
    ranks.stop()


def _one(model: str):
    """One process serving `model` (float32), in this process: the reference."""
    with _served(model) as client:
        yield client


@contextlib.contextmanager
def _served(model: str):
    from hearthlm.server import load
    from hearthlm.server.app import create_app

    served = load(model, dtype="float32")
    server = LiveServer(create_app(served))
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    finally:
        server.stop()
        served.engine.shutdown()


@pytest.fixture(scope="module")
def demo_one():
    yield from _one("hearth-demo")


@pytest.fixture(scope="module")
def llama_one(words):
    yield from _one(str(words))


def _chat(client, prompt: str, stream: bool, model: str = "hearth-demo") -> tuple[str, list[str] | None]:
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0)
    if stream:
        chunks = client.chat.completions.create(stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None
    choice = client.chat.completions.create(logprobs=True, **kw).choices[0]
    return choice.message.content, [t.token for t in choice.logprobs.content]


def _complete(client, model: str, prompt: str, stream: bool) -> tuple[str, list[str] | None]:
    kw = dict(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)), None
    choice = client.completions.create(logprobs=1, **kw).choices[0]
    return choice.text, choice.logprobs.tokens


def _at_once(calls) -> list:
    """Every call at the same time (the engine batches them), results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_chat_and_completions_match_one_process(demo_tp, demo_one):
    # One process answers one request at a time; the ranks, all at once.
    for stream in (False, True):
        one = [_chat(demo_one, p, stream) for p in CHATS]
        assert _at_once([partial(_chat, demo_tp.client, p, stream) for p in CHATS]) == one
        one = [_complete(demo_one, "hearth-demo", p, stream) for p in CHATS]
        assert _at_once([partial(_complete, demo_tp.client, "hearth-demo", p, stream) for p in CHATS]) == one
    assert all(text for text, _ in one)


@pytest.fixture(scope="module")
def moe_one() -> list[list[tuple[str, list[str] | None]]]:
    """One process's replies to CHATS on the demo MoE, one by one: without, then with streaming."""
    with _served("hearth-demo-moe") as one:
        return [[_chat(one, p, stream, "hearth-demo-moe") for p in CHATS] for stream in (False, True)]


@pytest.mark.parametrize("split", ["--ep", "--tp", "--ep --expert-budget 50%", "--pp --expert-budget 50%"])
def test_moe_demo_split_two_ways_matches_one_process(split, moe_one, tmp_path):
    """The demo MoE (8 experts, top-2, beside a dense MLP): experts divided among the ranks, or each one's width
    split, answers 4 chats at once as one process answers them one by one; so does each rank's pool of half
    its own experts under a budget, and each pipeline stage's pool of half its own layers' experts."""
    model = "hearth-demo-moe"
    ranks = Ranks(model, tmp_path / "err.log", split=split.split()[0], extra=tuple(split.split()[1:]))
    try:
        got = [_at_once([partial(_chat, ranks.client, p, stream, model) for p in CHATS]) for stream in (False, True)]
    finally:
        assert ranks.stop() == 0, ranks.err()
    assert got == moe_one
    assert all(text for text, _ in got[0])


def test_pipeline_stages_serve_what_one_process_serves(demo_one, tmp_path):
    """`hearth serve hearth-demo --pp 2`: layers 0-3 on rank 0, the KV-shared 4-5 with their source on rank 1."""
    ranks = Ranks("hearth-demo", tmp_path / "err.log", split="--pp")
    try:
        for stream in (False, True):
            one = [_chat(demo_one, p, stream) for p in CHATS]
            assert _at_once([partial(_chat, ranks.client, p, stream) for p in CHATS]) == one
            one = [_complete(demo_one, "hearth-demo", p, stream) for p in CHATS]
            assert _at_once([partial(_complete, ranks.client, "hearth-demo", p, stream) for p in CHATS]) == one
    finally:
        assert ranks.stop() == 0, ranks.err()


def test_llama_completions_match_one_process(llama_tp, llama_one, words):
    for stream in (False, True):
        one = [_complete(llama_one, words.name, p, stream) for p in WORDS]
        assert _at_once([partial(_complete, llama_tp.client, words.name, p, stream) for p in WORDS]) == one


def test_torchrun_ranks_serve_and_stop_cleanly(words, llama_one, tmp_path):
    """`torchrun --nproc-per-node 2 -m hearthlm.cli serve MODEL`: the same replies; SIGTERM to rank 0 stops all."""
    ranks = Ranks(str(words), tmp_path / "err.log", torchrun=True)
    try:
        assert _complete(ranks.client, words.name, WORDS[0], False) == _complete(llama_one, words.name, WORDS[0], False)
        os.kill(ranks.rank(0), signal.SIGTERM)
        assert ranks.proc.wait(timeout=SAFETY) == 0, ranks.err()
    finally:
        if ranks.proc.poll() is None:
            ranks.proc.kill()


def test_what_is_not_mirrored_is_refused_with_400(demo_tp):
    r = httpx.post(demo_tp.url + "/v1/embeddings", json={"model": "hearth-demo", "input": "hi"}, timeout=SAFETY)
    assert r.status_code == 400 and "not available with --tp" in r.json()["error"]["message"]
    body = {"model": "hearth-demo", "prompt": "hi", "max_tokens": 4, "speculative": True}
    r = httpx.post(demo_tp.url + "/v1/completions", json=body, timeout=SAFETY)
    assert r.status_code == 400 and "speculative decoding is not available with --tp" in r.json()["error"]["message"]
    assert _complete(demo_tp.client, "hearth-demo", CHATS[0], False)[0]  # and the server goes on


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--tp", "2"], "needs a MODEL"),
        (["serve", "hearth-demo", "--tp", "2", "--draft", "lookup"], "--draft is not available with --tp"),
        (
            ["serve", "hearth-demo-moe", "--tp", "2", "--expert-budget", "50%"],
            "--expert-budget is not available with --tp: its pool reads whole experts",
        ),
        (
            ["serve", "hearth-demo-moe", "--tp", "2", "--ep", "2"],
            "give one of --tp N, --ep N and --pp N, not --tp and --ep",
        ),
    ],
)
def test_options_that_cannot_be_mirrored_are_refused_before_any_rank_starts(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize("command", ["run", "serve"])
@pytest.mark.parametrize("flag", ["--tp", "--ep", "--pp"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_rank_count_below_one_is_refused(command, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "hearth-demo", *(["hi"] if command == "run" else []), flag, value])
    assert e.value.code == 2
    assert "is not a number of ranks: give a whole number, 1 or more" in capsys.readouterr().err


def test_sigterm_stops_every_rank_and_exits_0(demo_tp):
    follower = demo_tp.rank(1)
    body = {"model": "hearth-demo", "prompt": "hi", "stream": True, "max_tokens": 40, "ignore_eos": True}
    with httpx.stream("POST", demo_tp.url + "/v1/completions", json=body, timeout=SAFETY) as r:
        lines = r.iter_lines()
        next(lines)
        demo_tp.proc.send_signal(signal.SIGTERM)
        try:
            list(lines)
        except httpx.TransportError:
            pass  # cut at the end of the grace period
    assert demo_tp.proc.wait(timeout=SAFETY) == 0, demo_tp.err()
    err = demo_tp.err()
    assert "Traceback" not in err and "error:" not in err and "could not" not in err, err
    assert not Path(f"/proc/{follower}").exists()


def test_a_killed_follower_ends_the_server_with_an_error(llama_tp, words):
    body = {"model": words.name, "prompt": "w5 w6", "stream": True, "max_tokens": 200, "ignore_eos": True}
    with httpx.stream("POST", llama_tp.url + "/v1/completions", json=body, timeout=SAFETY) as r:
        lines = r.iter_lines()
        next(lines)
        os.kill(llama_tp.rank(1), signal.SIGKILL)
        start = time.monotonic()
        try:
            list(lines)
        except httpx.TransportError:
            pass  # the stream may end with an error event or be cut
        code = llama_tp.proc.wait(timeout=SAFETY)
    assert code != 0 and time.monotonic() - start < 90, llama_tp.err()
    assert "rank 1 of 2 was killed by signal 9; the other ranks were stopped" in llama_tp.err()


class Recorder:
    """A Channel stand-in: keeps what rank 0 sends; replays it to a follower."""

    def __init__(self):
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)

    def receive(self):
        return self.sent.pop(0)


def test_one_message_per_forward_replays_the_same_cache():
    """In one process, without ranks: what Leader sends, replayed by follow() on a second engine over the same
    model, writes the same K/V in the same blocks; embeddings and scoring are refused before any collective."""
    lead, other = LLM("hearth-demo", dtype="float32"), LLM("hearth-demo", dtype="float32")
    engine, mirror = Engine(lead, max_running=4, kv_blocks=32), Engine(other, max_running=4, kv_blocks=32)
    channel = Recorder()
    leader = Leader(engine, channel)
    for i, prompt in enumerate(["The sea", "Once upon a time there was", "A"]):
        engine.add_request(str(i), lead.tokenizer.encode(prompt), SamplingParams(max_tokens=5, temperature=0))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    forwards = [m for m in channel.sent if isinstance(m, Forward)]
    assert len(forwards) == len(channel.sent) >= steps and forwards[0].zeros and forwards[0].logits
    channel.send(Stop())
    follow(mirror, channel)
    zeroed = {w: [b for f in forwards for w2, bs in f.zeros if w2 == w for b in bs] for w in engine.blocks.pools}
    bs = engine.block_size
    for i, k in engine.cache.k.items():
        blocks = torch.tensor(zeroed[engine.cache.window[i]])
        for a, b in ((k, mirror.cache.k[i]), (engine.cache.v[i], mirror.cache.v[i])):
            a, b = (t.view(t.shape[0], -1, bs, t.shape[2])[:, blocks] for t in (a, b))
            assert a.abs().sum() > 0 and torch.equal(a, b)
    with pytest.raises(ValueError, match="not available with --tp"):
        lead.logits([1, 2, 3])
    with pytest.raises(ValueError, match="not available with --tp"):
        lead.embed("hi")
    media = type("Media", (), {"spans": [(1, 3)]})()
    with pytest.raises(ValueError, match="images and audio are not available with --tp"):
        engine.add_request("m", [2, 3, 4], SamplingParams(max_tokens=2), media=media)
    leader.stop()
    assert isinstance(channel.sent[-1], Stop)
