"""The model store against a fake Hub on loopback: pull (with the towers, or text files only; resume, errors), list,
rm, resolve.

No test reaches the real network: HF_ENDPOINT points at the fake Hub (or at a closed port), and
huggingface_hub's telemetry (which fetches from its import-time endpoint) is switched off.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB, save_gemma4_multimodal
from fakehub import FakeHub
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from hearthlm import LLM, store
from hearthlm.cli import main
from hearthlm.weights.loader import IGNORED as TOWERS

REPO = "google/gemma-4-Tiny-it"  # sharded: text shard, text+vision shard, vision-only shard
SINGLE = "acme/tiny-single"  # one model.safetensors with the vision tower inside
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
IDS = [2, 5, 17, 33, 8, 64]


def _tokenizer(folder: Path) -> None:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def _shard(src: Path, dst: Path) -> Path:
    """Re-save a single-file multimodal checkpoint the way the Hub ships big ones: three shards and an index,
    the last shard holding only vision-tower tensors, plus files a text model does not need."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    text = sorted(n for n in tensors if not n.startswith(TOWERS))
    other = sorted(n for n in tensors if n.startswith(TOWERS))
    assert other, "the multimodal checkpoint should have tower tensors"
    half = len(text) // 2
    groups = [text[:half], text[half:] + other[: len(other) // 2], other[len(other) // 2 :]]
    weight_map = {}
    for shard, names in zip(SHARDS, groups):
        save_file({n: tensors[n].contiguous() for n in names}, dst / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, shard)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (dst / store.INDEX).write_text(json.dumps(index))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "README.md").write_text("# tiny\n")
    (dst / "tokenizer.model").write_bytes(b"\0" * 2048)  # sentencepiece: not needed, tokenizer.json is there
    return dst


@pytest.fixture(scope="module")
def sources(checkpoint, tmp_path_factory):
    model, _ = checkpoint("gemma4_all")
    single = save_gemma4_multimodal(model, tmp_path_factory.mktemp("single"))
    _tokenizer(single)
    (single / "generation_config.json").write_text(json.dumps({"eos_token_id": [1]}))
    return {"single": single, "sharded": _shard(single, tmp_path_factory.mktemp("sharded") / "repo")}


@pytest.fixture
def hub(sources, tmp_path, monkeypatch):
    hub = FakeHub()
    hub.add(REPO, sources["sharded"])
    hub.add(SINGLE, sources["single"])
    hub.add("acme/gated-model", sources["single"], gated=True)
    hub.add("acme/no-weights", {"config.json": b"{}", "README.md": b"hi"})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HEARTHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(store, "DEMO_DIR", tmp_path / "demo")
    yield hub
    hub.close()


def _env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HEARTHLM_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"))
    return env | {"HF_HUB_DISABLE_TELEMETRY": "1"}


def _ctrl_c_default() -> None:
    """In the child before it starts: SIGINT back to its default, so that Python installs its Ctrl-C handler even
    when the test run itself was started with SIGINT ignored (as a shell's background job is)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _logits(model) -> torch.Tensor:
    return LLM(model, dtype="float32").logits(IDS)


# -- pull -------------------------------------------------------------------------------------------


def test_pull_fetches_only_the_text_model(hub, sources):
    folder = store.pull(REPO, progress=False, text_only=True)
    assert folder == store.store_root() / "google--gemma-4-Tiny-it"
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "generation_config.json", "tokenizer.json", store.INDEX, *SHARDS[:2], "hearth.json"}
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.log if "/resolve/" in path}
    assert SHARDS[2] not in fetched and "README.md" not in fetched and "tokenizer.model" not in fetched
    src = sources["sharded"]
    assert (folder / SHARDS[0]).read_bytes() == (src / SHARDS[0]).read_bytes()  # text-only shard: as is
    with safe_open(folder / SHARDS[1], "pt") as f, safe_open(src / SHARDS[1], "pt") as g:
        assert set(f.keys()) == {k for k in g.keys() if not k.startswith(TOWERS)}  # towers cut out by ranges
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    assert hub.sent[SHARDS[1]] < (src / SHARDS[1]).stat().st_size
    index = json.loads((folder / store.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(SHARDS[:2])
    meta = json.loads((folder / "hearth.json").read_text())
    assert meta["repo_id"] == REPO and meta["complete"] and meta["commit"] == hub.repos[REPO].commit
    assert "pulled_at" in meta and not (folder / store.PARTIAL).exists()
    assert torch.equal(_logits("gemma-4-tiny-IT"), _logits(sources["single"]))  # short name, any case


def test_single_file_checkpoint_gets_only_its_text_tensors(hub, sources):
    folder = store.pull(SINGLE, progress=False, text_only=True)
    src = sources["single"] / "model.safetensors"
    assert (folder / "model.safetensors").stat().st_size < src.stat().st_size
    assert hub.sent["model.safetensors"] < src.stat().st_size
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.keys() and not any(k.startswith(TOWERS) for k in f.keys())
    assert torch.equal(_logits(SINGLE), _logits(sources["single"]))


def test_dropped_connection_resumes_within_the_same_pull(hub, sources):
    size = (sources["sharded"] / SHARDS[0]).stat().st_size
    hub.drop[SHARDS[0]] = [size // 3]
    folder = store.pull(REPO, progress=False)
    assert (folder / SHARDS[0]).read_bytes() == (sources["sharded"] / SHARDS[0]).read_bytes()
    assert hub.sent[SHARDS[0]] == size  # only the missing bytes were sent again
    ranges = [r for _, path, r in hub.log if path.endswith(SHARDS[0])]
    assert ranges == [None, f"bytes={size // 3}-"]


def test_dropped_connection_resumes_a_text_only_subset(hub, sources):
    hub.drop[SHARDS[1]] = [1 << 30, 1 << 30, 100]  # the two header reads pass; the data read drops at 100 bytes
    folder = store.pull(REPO, progress=False, text_only=True)
    with safe_open(folder / SHARDS[1], "pt") as f, safe_open(sources["sharded"] / SHARDS[1], "pt") as g:
        assert f.keys() and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    data = (folder / SHARDS[1]).stat().st_size - _header_bytes(folder / SHARDS[1])
    assert hub.sent[SHARDS[1]] == _header_bytes(sources["sharded"] / SHARDS[1]) + data  # nothing sent twice


def test_pull_fetches_the_towers_by_default(hub, sources):
    folder = store.pull(REPO, progress=False)
    src = sources["sharded"]
    assert {p.name for p in folder.iterdir()} >= {store.INDEX, *SHARDS}
    assert all((folder / s).read_bytes() == (src / s).read_bytes() for s in SHARDS)  # whole, towers inside
    assert json.loads((folder / store.INDEX).read_text()) == json.loads((src / store.INDEX).read_text())
    assert not any(r for _, path, r in hub.log if SHARDS[1] in path)  # no header reads, no ranges: whole files
    meta = json.loads((folder / "hearth.json").read_text())
    assert meta["text_only"] is False and not any(f.get("text_only") for f in meta["files"].values())
    llm = LLM(REPO, dtype="float32")
    assert llm.modalities == {"text", "image"} and llm.media_encoder.towers._get("vision")
    assert torch.equal(_logits(REPO), _logits(sources["single"]))
    entry = next(e for e in store.list_models() if e.name == REPO)
    assert entry.inputs() == "text, image"


def test_text_only_then_full_pull_fetches_what_was_cut(hub, sources):
    folder = store.pull(REPO, progress=False, text_only=True)
    entry = next(e for e in store.list_models() if e.name == REPO)
    assert entry.inputs() == "text (image: towers not pulled)"
    sent = dict(hub.sent)
    store.pull(REPO, progress=False)
    assert hub.sent[SHARDS[0]] == sent[SHARDS[0]]  # the text-only shard was whole already: kept
    assert hub.sent[SHARDS[1]] - sent[SHARDS[1]] == (sources["sharded"] / SHARDS[1]).stat().st_size  # refetched
    assert (folder / SHARDS[2]).read_bytes() == (sources["sharded"] / SHARDS[2]).read_bytes()
    assert next(e for e in store.list_models() if e.name == REPO).inputs() == "text, image"
    store.pull(REPO, progress=False, text_only=True)  # and back: the towers' shard goes, the index is cut again
    assert not (folder / SHARDS[2]).exists() and store.towers(folder) == ({"image"}, set())


def test_subset_keeps_tensors_aligned_or_takes_the_whole_file():
    f32 = {"dtype": "F32", "shape": [2]}
    header = {
        "model.vision_tower.a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
        "model.language_model.b": {**f32, "data_offsets": [8, 16]},
    }
    head, ranges = store._subset_header(dict(header), 64)
    assert ranges == [(72, 80)] and len(head) % 8 == 0
    assert json.loads(head[8:])["model.language_model.b"]["data_offsets"] == [0, 8]
    header["model.vision_tower.a"] = {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}
    header["model.language_model.b"] = {**f32, "data_offsets": [6, 14]}  # a writer that did not sort by width
    assert store._subset_header(header, 64) is None


def test_interrupted_pull_resumes_in_the_next_run(hub, sources, tmp_path):
    size = (sources["sharded"] / SHARDS[0]).stat().st_size
    cut = size // 2
    hub.stall[SHARDS[0]] = cut  # send half, then hold the connection until the client is killed
    proc = subprocess.Popen(
        [sys.executable, "-m", "hearthlm.cli", "pull", REPO],
        env=_env(hub, tmp_path) | {"HF_HUB_DOWNLOAD_TIMEOUT": "600"},  # the stall ends when the test says, not before
        preexec_fn=_ctrl_c_default,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = store.store_root() / "google--gemma-4-Tiny-it" / store.PARTIAL
    deadline = time.monotonic() + 600  # a safety net only: the loop waits for the bytes, not for a time
    while sum(p.stat().st_size for p in partial.glob("*")) < cut:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=600)
    hub.release.set()
    assert proc.returncode == 130 and "again to resume" in err
    with pytest.raises(FileNotFoundError, match="did not finish"):
        store.resolve(REPO)
    assert [e.complete for e in store.list_models()] == [False]
    sent = hub.sent[SHARDS[0]]
    folder = store.pull(REPO, progress=False)
    assert (folder / SHARDS[0]).read_bytes() == (sources["sharded"] / SHARDS[0]).read_bytes()
    assert hub.sent[SHARDS[0]] - sent == size - cut  # the second run fetched only the rest


def test_pulling_again_downloads_nothing(hub):
    store.pull(REPO, progress=False)
    before = dict(hub.sent)
    store.pull(REPO, progress=False)
    assert dict(hub.sent) == before | {store.INDEX: 2 * before[store.INDEX]}  # the index is read to plan
    assert [path.rsplit("/", 1)[-1] for _, path, _ in hub.log[-2:]] == ["gemma-4-Tiny-it", store.INDEX]


def test_offline_fails_at_once_and_says_so(hub, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(store.HubUnreachableError, match="offline") as e:
        store.pull(REPO, progress=False)
    assert time.monotonic() - start < 2.0
    assert "hearth list" in str(e.value) and not store.store_root().exists()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(store.HubUnreachableError, match="HF_HUB_OFFLINE"):
        store.pull(REPO, progress=False)
    assert hub.log == []


def test_hub_errors_are_clear(hub, monkeypatch):
    with pytest.raises(store.PullError, match="not found on the Hugging Face Hub"):
        store.pull("acme/missing", progress=False)
    with pytest.raises(store.PullError, match="no revision 'v9'"):
        store.pull(REPO, "v9", progress=False)
    with pytest.raises(store.PullError, match="no safetensors weights"):
        store.pull("acme/no-weights", progress=False)
    with pytest.raises(store.PullError, match="not a Hugging Face repo id"):
        store.pull("not an id", progress=False)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(store.PullError, match="gated.*HF_TOKEN.*hf auth login"):
        store.pull("acme/gated-model", progress=False)
    assert not store.store_root().exists()  # failed pulls leave nothing behind
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    assert store.pull("acme/gated-model", progress=False).is_dir()


# -- resolve, list, rm ------------------------------------------------------------------------------


def _demo(sources) -> Path:
    demo = store.DEMO_DIR / store.DEMO_MODEL
    demo.mkdir(parents=True)
    for p in sources["single"].iterdir():
        (demo / p.name).write_bytes(p.read_bytes())
    return demo


def test_resolve_names(hub, sources, tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in demo model 'hearth-demo' is missing"):
        store.resolve(None)
    demo = _demo(sources)
    assert store.resolve(None) == store.resolve("demo") == store.resolve("HEARTH-DEMO") == demo
    with pytest.raises(FileNotFoundError, match="run `hearth pull google/gemma-4-Tiny-it`"):
        store.resolve(REPO)
    folder = store.pull(REPO, progress=False)
    assert store.resolve(REPO) == store.resolve("gemma-4-tiny-it") == store.resolve(str(folder)) == folder
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert store.resolve(str(gguf)) == gguf
    with pytest.raises(FileNotFoundError, match="not a local checkpoint folder"):
        store.resolve(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no model named 'nope'"):
        store.resolve("nope")
    twin = store.store_root() / "other--gemma-4-Tiny-it"
    twin.mkdir()
    (twin / "hearth.json").write_text(json.dumps({"repo_id": "other/gemma-4-Tiny-it", "complete": True}))
    with pytest.raises(FileNotFoundError, match="matches several models"):
        store.resolve("gemma-4-tiny-it")
    assert store.resolve("other/gemma-4-Tiny-it") == twin


def test_llm_without_a_model_loads_the_demo(hub, sources):
    with pytest.raises(FileNotFoundError, match="demo model"):
        LLM()
    _demo(sources)
    assert torch.equal(LLM(dtype="float32").logits(IDS), _logits(sources["single"]))


def test_list_and_rm(hub, sources, tmp_path):
    _demo(sources)
    store.pull(REPO, progress=False)
    entries = {e.name: e for e in store.list_models()}
    assert set(entries) == {"hearth-demo", REPO}
    assert entries["hearth-demo"].kind == "built-in" and entries[REPO].kind == "pulled"
    pulled = entries[REPO]
    assert pulled.family() == "gemma4" and pulled.format().startswith("safetensors")
    assert pulled.size() == sum(p.stat().st_size for p in pulled.path.iterdir())
    for name in ("hearth-demo", "demo", str(store.DEMO_DIR / "hearth-demo")):
        with pytest.raises(ValueError, match="built-in"):
            store.remove(name)
    with pytest.raises(ValueError, match="not in the model store"):
        store.remove(str(sources["single"]))
    with pytest.raises(FileNotFoundError, match="no model in the store"):
        store.remove("nope")
    assert store.remove("gemma-4-tiny-it") == pulled.path.resolve()
    assert not pulled.path.exists() and sources["single"].exists()
    assert [e.name for e in store.list_models()] == ["hearth-demo"]


def test_cli_pull_list_rm(hub, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")

    def hearth_(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = hearth_("pull", REPO)
    assert code == 0 and "pulled google/gemma-4-Tiny-it" in err and "hearth run gemma-4-Tiny-it" in err
    code, out, _ = hearth_("list")
    row = next(line for line in out.splitlines() if REPO in line)
    assert code == 0 and re.search(r"  [\d.]+ [kM]B  gemma4  safetensors fp32  text, image  ", row), row
    code, _, err = hearth_("pull", REPO, "--text-only")
    assert code == 0 and "input: text (image: towers not pulled)" in err
    code, _, err = hearth_("rm", "hearth-demo")
    assert code == 2 and "error:" in err and "built-in" in err
    assert hearth_("rm", "gemma-4-tiny-it")[0] == 0
    assert "no models" in hearth_("list")[1]
    code, _, err = hearth_("pull", "acme/missing")
    assert code == 2 and "not found" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = hearth_("pull", REPO)
    assert code == 2 and "offline" in err
    code, _, err = hearth_("run", "acme/unpulled", "hi")
    assert code == 2 and "hearth pull acme/unpulled" in err


def test_cli_pull_with_draft_puts_the_drafter_beside_the_model(hub, monkeypatch, capsys):
    from hearthlm.engine.mtp import find_assistant

    monkeypatch.setenv("COLUMNS", "250")
    drafter = Path(store.__file__).parent / "demo" / "hearth-demo-assistant"
    hub.add(
        REPO + "-assistant",
        {f.name: f.read_bytes() for f in drafter.iterdir() if f.suffix in (".json", ".safetensors")},
    )
    code = main(["pull", REPO, "--with-draft"])
    _, err = capsys.readouterr()
    assert code == 0 and f"pulled its drafter {REPO}-assistant" in err and "--draft auto" in err, err
    folder = store.store_root() / "google--gemma-4-Tiny-it"
    assert find_assistant(folder) == store.store_root() / "google--gemma-4-Tiny-it-assistant"
    assert (find_assistant(folder) / "model.safetensors").read_bytes() == (drafter / "model.safetensors").read_bytes()
    assert main(["list"]) == 0
    listed = capsys.readouterr()[0]
    assert re.search(r"google/gemma-4-Tiny-it-assistant .*none: a drafter for --draft", listed), listed
    code = main(["pull", SINGLE, "--with-draft"])
    _, err = capsys.readouterr()
    assert code == 2 and f"{SINGLE} has no drafter on the Hub ({SINGLE}-assistant was not found)" in err
    assert "--draft lookup" in err


@pytest.mark.parametrize("value", ["soon", "0", "-5", "2.5"])
def test_a_bad_download_timeout_is_a_clear_error(hub, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(store.PullError, match=f"HF_HUB_DOWNLOAD_TIMEOUT='{value}': give the whole seconds"):
        store.pull(REPO, progress=False)


def test_pulled_files_are_owner_only(hub):
    """Another user who can read a checkpoint can tell from its page cache which experts ran (docs/privacy.md)."""
    folder = store.pull(REPO, progress=False, text_only=True)
    for d in (folder, store.store_root()):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for f in folder.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f.name
