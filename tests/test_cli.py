"""`hearth run` end to end on a tiny checkpoint with a word-level tokenizer."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from checkpoints import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers

from hearthlm import LLM, SamplingParams


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory):
    _, src = checkpoint("gemma4_all")
    dst = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(src, dst)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    return dst


def hearth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearthlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_streams_the_same_text_as_the_api(folder):
    prompt = "w5 w17 w33 w8"
    expected = LLM(folder).generate(prompt, SamplingParams(max_tokens=10, temperature=0))[0].text
    result = hearth("run", str(folder), prompt, "--temperature", "0", "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "time to first token" in result.stderr


def test_run_reports_bad_input_without_a_traceback(folder, tmp_path):
    result = hearth("run", str(tmp_path / "missing"), "hi")
    assert result.returncode == 2
    assert "error:" in result.stderr and "not a local checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr
    result = hearth("run", str(folder), "hi", "--top-p", "0")
    assert result.returncode == 2 and "top_p" in result.stderr


# -- the demo model, the chat template, `hearth chat` ------------------------------------------------------
GREEDY = ("--temperature", "0", "--max-tokens", "40")


@pytest.fixture(scope="module")
def demo():
    return LLM()


def test_run_with_no_model_answers_with_the_demo_through_its_chat_template(demo):
    params = SamplingParams(max_tokens=40, temperature=0)
    expected = demo.chat([{"role": "user", "content": "Tell me a fortune."}], params).text
    result = hearth("run", "Tell me a fortune.", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "time to first token" in result.stderr
    raw = hearth("run", "demo", "And God said", "--raw", *GREEDY)
    assert raw.stdout == demo.generate("And God said", params)[0].text + "\n"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    piped = subprocess.run(
        [sys.executable, "-m", "hearthlm.cli", "run", "hearth-demo", "--system", "Be brief.", *GREEDY],
        input="Hi", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert piped.stdout == demo.chat(system, params).text + "\n", piped.stderr


def test_run_tells_a_model_name_from_a_prompt(tmp_path):
    missing = hearth("run", "someone/some-model")
    assert missing.returncode == 2 and "hearth pull someone/some-model" in missing.stderr
    no_prompt = subprocess.run(
        [sys.executable, "-m", "hearthlm.cli", "run", "hearth-demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert no_prompt.returncode == 2 and "give a prompt" in no_prompt.stderr
    raw_system = hearth("run", "Hi", "--raw", "--system", "x")
    assert raw_system.returncode == 2 and "--system" in raw_system.stderr


def test_chat_keeps_the_conversation_and_resets_it(demo):
    params = SamplingParams(max_tokens=40, temperature=0)
    first = [{"role": "user", "content": "Tell me a joke."}]
    reply1 = demo.chat(first, params).text
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "What is a list?"}]
    reply2 = demo.chat(second, params).text
    script = "Tell me a joke.\nWhat is a list?\n/reset\nTell me a joke.\n/nonsense\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "hearthlm.cli", "chat", *GREEDY],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    turns = result.stdout.split(">>> ")  # a prompt before each of the 6 lines; /reset and /nonsense print nothing
    assert turns[1:] == [reply1 + "\n", reply2 + "\n", "", reply1 + "\n", "", ""]
    assert "conversation cleared" in result.stderr and "unknown command /nonsense" in result.stderr
    assert result.stderr.count("tokens/s") == 3


def test_ctrl_c_stops_the_reply_not_the_chat(demo, monkeypatch, capsys):
    from hearthlm import cli

    seen: list[list[dict]] = []

    def chat(messages, params, on_token):
        seen.append(list(messages))
        ids = demo.tokenizer.encode(" partial answer", add_special_tokens=False)
        for t in ids:
            on_token(0, t)
        if len(seen) == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of generation
        return None

    lines = iter(["first", "second", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(cli, "_load", lambda args: demo)
    monkeypatch.setattr(demo, "chat", chat)
    assert cli.main(["chat"]) == 0
    assert len(seen) == 2  # the second question was still answered
    assert seen[1][1] == {"role": "assistant", "content": " partial answer"}  # the interrupted reply is kept
    assert "(stopped)" in capsys.readouterr().err


def test_chat_drops_the_oldest_turns_when_the_context_is_full(demo, monkeypatch, capsys):
    from hearthlm import ContextLengthError, cli

    seen: list[list[str]] = []

    def chat(messages, params, on_token):  # a context that holds the system message and 3 more
        seen.append([m["content"] for m in messages])
        if len(messages) > 4:
            raise ContextLengthError("prompt of 9999 tokens is longer than the model's context (2048)")
        for t in demo.tokenizer.encode(f" answer {len(seen)}", add_special_tokens=False):
            on_token(0, t)

    lines = iter(["q1", "q2", "q3", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(cli, "_load", lambda args: demo)
    monkeypatch.setattr(demo, "chat", chat)
    assert cli.main(["chat", "--system", "sys"]) == 0
    assert seen == [["sys", "q1"], ["sys", "q1", " answer 1", "q2"], ["sys", "q1", " answer 1", "q2", " answer 2", "q3"],
                    ["sys", "q2", " answer 2", "q3"]]  # fmt: skip
    assert "older turns dropped" in capsys.readouterr().err


def test_a_question_longer_than_the_context_is_an_error_not_a_crash(demo):
    from hearthlm import ContextLengthError

    with pytest.raises(ContextLengthError, match="longer than the model's context"):
        demo.chat([{"role": "user", "content": "word " * 5000}], SamplingParams(max_tokens=4))
    result = subprocess.run(
        [sys.executable, "-m", "hearthlm.cli", "chat", *GREEDY], input="word " * 5000 + "\nHi\n", capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "longer than the model's context" in result.stderr
    assert result.stderr.count("tokens/s") == 1  # the next question was still answered
