"""The engines `hearth bench` measures, each in its own worker process (`python -m hearthlm.bench.engines
--worker`), and the parent's handle on a worker."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .results import BenchError, Quality, compare, quality_ids

# -- engines (in the worker process) ------------------------------------------------------------------


def _memory_baseline(device: str) -> int:
    """RSS after the imports; resets the peak (VmHWM, or CUDA's) so that the peak counts from here."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _status_kb("VmRSS")


def _memory_peak(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class HearthlmEngine:
    name = "hearthlm"

    @staticmethod
    def check(path: Path) -> None:
        """Raise BenchError when this engine cannot run `path` here (checked before any worker starts)."""

    @staticmethod
    def imports() -> None:
        """Import what loading will need, before the memory baseline is taken."""
        from .. import api  # noqa: F401

    def __init__(self, spec: dict):
        from ..api import LLM

        self.spec = spec
        self.llm = LLM(
            spec["path"], dtype=spec["dtype"], device=spec["device"], quant=spec["quant"],
            expert_budget=spec.get("expert_budget"), draft=spec.get("draft"),
        )  # fmt: skip
        # Every run repeats one prompt: without this the prefix cache would serve it, and no run but the first
        # would prefill.
        self.llm.engine(prefix_caching=False)

    def run(self, ids: list[int], n: int) -> tuple[float, list[float], int]:
        """-> (start time, a timestamp per generated token, tokens generated)."""
        from ..api import SamplingParams

        pool = getattr(self.llm.model, "expert_pool", None)
        if pool is not None:
            pool.reset_stats()  # counters of this run only
        stamps: list[float] = []
        before = self.llm.engine().stats()
        start = time.perf_counter()
        out = self.llm.generate(
            [ids],
            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
            on_token=lambda i, t: stamps.append(time.perf_counter()),
        )
        after = self.llm.engine().stats()
        self.drafted = after.drafted_tokens - before.drafted_tokens
        self.accepted = after.accepted_tokens - before.accepted_tokens
        return start, stamps, len(out[0].token_ids)

    def draft(self) -> dict:
        """Draft tokens verified and accepted in the last run (speculative decoding)."""
        return {"drafted": self.drafted, "accepted": self.accepted} if self.spec.get("draft") else {}

    def moe(self, seconds: float) -> dict | None:
        """Expert-pool figures of the last run (under an expert budget)."""
        s = self.llm.moe_stats()
        if s is None:
            return None
        return {
            "hit_rate": s.hit_rate,
            "mb_per_token": s.bytes_per_token / 1e6,
            "fetch_share": s.fetch_seconds / seconds,
        }

    def quality(self) -> Quality:
        from ..api import LLM

        reference = LLM(self.spec["path"], dtype=self.spec["dtype"], device=self.spec["device"])
        return compare(reference, self.llm, quality_ids(reference))

    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads, as loaded: every tensor but the gathered tables (the embedding when
        an LM head exists, Gemma 4's PLE table), and of the experts only those a token routes to."""
        model, cfg = self.llm.model, self.llm.config
        seen: set[int] = set()
        total = 0.0
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.data_ptr() in seen or name.startswith("ple.table"):
                continue
            seen.add(t.data_ptr())
            if name.startswith("embed.") and model.lm_head is not None:
                continue
            share = cfg.experts_per_token / cfg.num_experts if ".experts." in name else 1
            total += t.numel() * t.element_size() * share
        return int(total)


class TransformersEngine:
    name = "transformers"

    @staticmethod
    def check(path: Path) -> None:
        if path.suffix == ".gguf":
            raise BenchError(
                f"`--vs transformers` runs safetensors checkpoints and {path.name} is a GGUF file: compare a GGUF "
                "with --vs llama.cpp, or give the original checkpoint folder"
            )
        if importlib.util.find_spec("transformers") is None:
            raise BenchError(
                "`--vs transformers` needs transformers (a test-only dependency): "
                "pip install 'hearthlm[test]' (or pip install transformers)"
            )

    @staticmethod
    def imports() -> None:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
        from transformers.generation.streamers import BaseStreamer  # noqa: F401

    def __init__(self, spec: dict):
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()
        dtype = getattr(torch, spec["dtype"])
        auto = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype)
        self.model = auto.to(spec["device"]).eval()
        self.device = spec["device"]

    def run(self, ids: list[int], n: int) -> tuple[float, list[float], int]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):  # generate() puts the prompt first, then each new token
            def __init__(self):
                self.stamps: list[float] = []
                self.prompt_seen = False

            def put(self, value):
                if self.prompt_seen:
                    self.stamps.append(time.perf_counter())
                self.prompt_seen = True

            def end(self):
                pass

        streamer = Stamps()
        x = torch.tensor([ids], device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                use_cache=True,
                streamer=streamer,
                pad_token_id=0,
            )
        return start, streamer.stamps, out.shape[1] - len(ids)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, on the GGUF file hearthlm runs too. Each step is one llama_decode call
    (`Llama.eval`) and the next token is the argmax of the logits it returns: llama.cpp's Python sampler, which
    hides its real speed, is never timed (DESIGN.md)."""

    name = "llama.cpp"

    @staticmethod
    def check(path: Path) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise BenchError(
                "`--vs llama.cpp` needs llama-cpp-python, which is not installed: pip install llama-cpp-python "
                "(it builds llama.cpp from source, ~13 minutes on 2 cores)"
            )
        if path.suffix != ".gguf":
            raise BenchError(
                f"`--vs llama.cpp` runs a .gguf file and {path} is not one: give the model as a .gguf "
                "(hearthlm runs the same file, so both engines read the same weights)"
            )

    @staticmethod
    def imports() -> None:
        import llama_cpp  # noqa: F401
        import numpy  # noqa: F401

    def __init__(self, spec: dict):
        import llama_cpp

        threads = os.cpu_count() or 1
        self.path = Path(spec["path"])
        with _extra_buffers(spec.get("extra_buffers", True)):
            self.llm = llama_cpp.Llama(
                str(self.path),
                n_ctx=len(spec["prompt"]) + spec["gen_len"] + 1,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=-1 if spec["device"].startswith("cuda") else 0,
                verbose=False,
            )

    def _next(self) -> int:
        # The last position's logits, from the context: llama-cpp-python fills `scores` only with logits_all=True
        # (which would compute the logits of every prompt position), and reading it otherwise gives zeros.
        import llama_cpp
        import numpy as np

        last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),)).argmax())

    def run(self, ids: list[int], n: int) -> tuple[float, list[float], int]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        tokens, stamps = [self._next()], [time.perf_counter()]
        while len(tokens) < n:
            self.llm.eval([tokens[-1]])
            tokens.append(self._next())
            stamps.append(time.perf_counter())
        return start, stamps, len(tokens)

    def bytes_per_token(self) -> int:
        """The file's tensor bytes one decode step reads: all but token_embd when an output matrix exists, and of
        the stacked experts (`*_exps`) only those a token routes to."""
        from ..weights.gguf import GGUFFile
        from ..weights.gguf_model import hf_config

        gguf = GGUFFile(self.path)
        hf = hf_config(gguf)
        experts = hf.get("num_local_experts") or hf.get("num_experts")  # Gemma 4 names them num_experts / top_k_experts
        share = (hf.get("num_experts_per_tok") or hf.get("top_k_experts") or 0) / experts if experts else 1
        tied = "output.weight" not in gguf.tensors
        total = 0.0
        for name, info in gguf.tensors.items():
            if name == "token_embd.weight" and not tied:
                continue
            total += info.nbytes * (share if "_exps." in name else 1)
        return int(total)


@contextlib.contextmanager
def _extra_buffers(on: bool):
    """llama.cpp's extra CPU buffer types (weights repacked for AMX or wide SIMD at load) on or off for the models
    loaded inside: llama-cpp-python's Llama has no argument for llama_model_params.use_extra_bufts, so the default
    parameters it starts from are swapped for the duration."""
    import llama_cpp.llama_cpp as lib

    if on:
        yield
        return
    default = lib.llama_model_default_params

    def without():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without
    try:
        yield
    finally:
        lib.llama_model_default_params = default


ENGINES = {e.name: e for e in (HearthlmEngine, TransformersEngine, LlamaCppEngine)}


# -- the worker process -------------------------------------------------------------------------------


def _worker() -> int:
    """Serve one engine on one model over stdin/stdout, one JSON object per line:
    spec -> {"load_s"} (after a warm-up run); "run" -> a sample; "memory" -> {"peak"}; "quality"; "bytes" (weight
    bytes per decode step; hearthlm and llama.cpp); "quit"."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print must not break the protocol
    spec = json.loads(sys.stdin.readline())
    engine_cls = ENGINES[spec["engine"]]
    engine_cls.imports()  # the imports count in the baseline, not in the peak
    baseline = _memory_baseline(spec["device"])

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        start = time.perf_counter()
        engine = engine_cls(spec)
        load_s = time.perf_counter() - start
        engine.run(spec["prompt"], spec["gen_len"])  # warm-up: not counted
        reply({"load_s": load_s})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "run":
                begin, stamps, n = engine.run(spec["prompt"], spec["gen_len"])
                sample = {
                    "ttft": stamps[0] - begin,
                    "decode": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                    "tokens": n,
                }
                moe = engine.moe(stamps[-1] - begin) if hasattr(engine, "moe") else None
                draft = engine.draft() if hasattr(engine, "draft") else {}
                reply(sample | ({"moe": moe} if moe else {}) | draft)
            elif cmd == "memory":
                reply({"peak": _memory_peak(spec["device"]) - baseline})
            elif cmd == "quality":
                reply({"quality": asdict(engine.quality())})
            elif cmd == "bytes":
                reply({"bytes": engine.bytes_per_token()})
            else:
                return 0
    except Exception as e:  # the parent reports it with the engine and model named
        reply({"error": str(e) or type(e).__name__, "type": type(e).__name__})
        return 1
    return 0


class WorkerDied(BenchError):
    """The worker process ended without answering (a crash inside the engine's native code)."""


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", "hearthlm.bench.engines", "--worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            self.load_s = self.ask(json.dumps(spec))["load_s"]
        except BenchError:
            self.close()
            raise

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        what = f"{self.spec['engine']} on {Path(self.spec['path']).name}"
        if not answer:
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise WorkerDied(f"{what}: the worker process died (exit {self.proc.wait()}):\n{tail}")
        reply = json.loads(answer)
        if "error" in reply:
            raise BenchError(f"{what}: {reply['error']}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker())
