"""`hearth` command line: parses arguments, then calls the Python API."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _load(args: argparse.Namespace):
    from .api import LLM
    from .distributed.run import join_ranks

    how = _split(args)[1]
    mesh = join_ranks(args.device, how)  # a rank of `hearth run --tp N` (or of torchrun): None otherwise
    llm = LLM(
        args.model,
        dtype=args.dtype,
        quant=args.quant,
        expert_budget=args.expert_budget,
        moe_profile=not args.no_moe_profile,
        mmproj=getattr(args, "mmproj", None),
        draft=_draft(args),
        device=args.device if mesh is None else str(mesh.device(args.device)),
        privacy=_privacy(args),
        quant_towers=args.quant_towers,
        mesh=mesh,  # its stage of layers (--pp N), or its slices (--tp N / --ep N)
    )  # fmt: skip  (the loader shows its own progress bar)
    if mesh is not None:
        args.seed = mesh.shared_int(args.seed)  # every rank must sample the same tokens
    if llm.privacy_note:
        _err().print(f"[dim]{llm.privacy_note}[/dim]")
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer.json: `hearth {args.command}` needs one to read text")
    return llm


def _draft(args: argparse.Namespace) -> str | None:
    """--draft as LLM's `draft`: "auto", "lookup", a drafter folder, or None for "off"."""
    value = getattr(args, "draft", "off")
    return None if value == "off" else value


def _params(args: argparse.Namespace):
    from .api import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
    )


class _Stats:
    """Time to first token and decode speed of one reply, for the dim line after it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.count = 0

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.count += 1

    def line(self) -> str:
        if self.first is None:
            return "0 tokens"
        decode = time.perf_counter() - self.first
        rate = f", {(self.count - 1) / decode:.1f} tokens/s" if self.count > 1 and decode > 0 else ""
        return f"{self.count} tokens{rate}, time to first token {(self.first - self.start) * 1000:.0f} ms"


def _stream(llm, call) -> str:
    """Run `call(on_token)` (llm.generate or llm.chat), printing text as it is decoded, then the stats line.
    Ctrl-C stops the reply and keeps what was printed. Returns the text printed."""
    detok = llm.tokenizer.detokenizer()
    stats = _Stats()
    pieces: list[str] = []
    stops = llm.stop_token_ids

    def on_token(_: int, token: int) -> None:
        stats.token()
        if token in stops:
            return
        piece = detok.push(token)
        if piece:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

    stopped = False
    try:
        call(on_token)
    except KeyboardInterrupt:
        stopped = True
    pieces.append(detok.flush())
    sys.stdout.write(pieces[-1] + "\n")
    sys.stdout.flush()
    _err().print(f"[dim]{stats.line()}{' (stopped)' if stopped else ''}[/dim]")
    return "".join(pieces)


def _messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _run(args: argparse.Namespace) -> int:
    from . import store

    if args.prompt is None and args.model is not None and not store.is_model_name(args.model):
        args.model, args.prompt = None, args.model  # `hearth run "a prompt"`: the demo model answers it
    store.resolve(args.model)  # an unknown model is reported before anything else
    if args.prompt is None and not sys.stdin.isatty():
        args.prompt = sys.stdin.read()
    if not (args.prompt or "").strip():
        chat = f"`hearth chat {args.model}`" if args.model else "`hearth chat`"
        raise ValueError(f"give a prompt: `hearth run [MODEL] PROMPT` (or pipe it in), or talk with {chat}")
    media = _media_parts(args.image, args.audio)  # a missing file is reported before the model loads
    from .distributed.mesh import launched

    ranks, how = _split(args)
    if ranks > 1 and not launched():  # the ranks it starts keep --ep / --pp, which tell them how to split
        from .distributed.run import run_ranks

        _check_split(args.model, ranks, how)
        return run_ranks(ranks, args.argv, args.prompt)
    llm = _load(args)
    params = _params(args)
    start = time.perf_counter()
    if args.raw or not llm.tokenizer.has_chat_template:
        if args.system or media:
            what = "--system" if args.system else "--image / --audio"
            raise ValueError(f"{what} needs the chat template, which --raw (or this model) does not use")
        _stream(llm, lambda on_token: llm.generate(args.prompt, params, on_token=on_token))
    else:
        _check_modalities(llm, media)
        messages = _messages(args.system) + [_user(args.prompt, media)]
        options = _media_options(args)
        _stream(llm, lambda on_token: llm.chat(messages, params, on_token=on_token, **options))
    if args.moe_stats:
        _err().print(f"[dim]{_moe_line(llm, time.perf_counter() - start)}[/dim]")
    return 0


# -- images and audio ---------------------------------------------------------------------------------------------


def _media_part(kind: str, path: str) -> dict:
    """A content part for the image or audio file at `path` (checked to exist now, not after the model loads)."""
    file = Path(path.strip().strip("'\"")).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{kind} file {file} does not exist" if not file.exists() else f"{file} is not a file")
    return {"type": kind, kind: str(file)}


def _media_parts(images: list[str] | None, audio: list[str] | None) -> list[dict]:
    return [_media_part("image", p) for p in images or []] + [_media_part("audio", p) for p in audio or []]


def _user(text: str, media: list[dict]) -> dict:
    """A user message: plain text, or the media parts first and then the text."""
    if not media:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def _check_modalities(llm, media: list[dict]) -> None:
    """Refuse image / audio parts the model has no tower for, naming the model and what it takes."""
    from .multimodal import ModalityError

    for kind in dict.fromkeys(p["type"] for p in media):
        if kind not in llm.modalities:
            takes = " and ".join(sorted(llm.modalities))
            raise ModalityError(
                f"{llm.path.name} does not take {kind} input (it takes {takes}): drop --{kind}, or use a model with "
                f"a {'vision' if kind == 'image' else 'audio'} tower (e.g. a Gemma 4 checkpoint pulled with its towers)"
            )


def _media_options(args: argparse.Namespace) -> dict:
    return {"image_tokens": args.image_tokens} if args.image_tokens is not None else {}


def _moe_line(llm, seconds: float) -> str:
    stats = llm.moe_stats()
    if stats is None:
        return "experts: all resident (no --expert-budget)" if llm.config.num_experts else "no experts in this model"
    return stats.summary(seconds)


_CHAT_HELP = (
    "/image PATH and /audio PATH attach a file to your next message, /reset clears the conversation, /exit leaves "
    "(or Ctrl-D); Ctrl-C stops a reply"
)


def _chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    if not llm.tokenizer.has_chat_template:
        raise ValueError(f"{llm.path} has no chat template: use `hearth run` for plain completions")
    params = _params(args)
    err = _err()
    err.print(f"[dim]{llm.path.name}: {_CHAT_HELP}[/dim]")
    history = _messages(args.system)
    attached: list[dict] = []  # /image and /audio files for the next message
    options = _media_options(args)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            sys.stdout.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, stay in the chat
            sys.stdout.write("\n")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/bye", "/quit"):
            return 0
        if command == "/reset":
            history, attached = _messages(args.system), []
            err.print("[dim]conversation cleared[/dim]")
            continue
        if command.split()[0] in ("/image", "/audio"):
            _attach(llm, command, attached, err)
            continue
        if command.startswith("/"):
            err.print(f"[dim]unknown command {command.split()[0]}: {_CHAT_HELP}[/dim]")
            continue
        history.append(_user(line, attached))
        attached = []
        reply = _reply(llm, history, params, err, options)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})


def _attach(llm, command: str, attached: list[dict], err: Console) -> None:
    """`/image PATH` or `/audio PATH`: check the file and the model, then hold the part for the next message."""
    kind, _, path = command.partition(" ")
    kind = kind[1:]
    if not path.strip():
        err.print(f"[dim]give a file: /{kind} PATH[/dim]")
        return
    try:
        part = _media_part(kind, path)
        _check_modalities(llm, [part])
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}")
        return
    attached.append(part)
    count = len(attached)
    err.print(f"[dim]attached {Path(part[kind]).name}: {count} file{'s' * (count > 1)} go with your next message[/dim]")


def _reply(llm, history: list[dict], params, err: Console, options: dict | None = None) -> str | None:
    """Answer the conversation, dropping its oldest exchanges (never the system message or the new question)
    while it is longer than the model's context. None when it cannot be answered; the error is printed.
    `options`: media keywords for llm.chat (image_tokens)."""
    from .api import ContextLengthError

    options = options or {}
    while True:
        try:
            return _stream(llm, lambda on_token: llm.chat(history, params, on_token=on_token, **options))
        except ContextLengthError as e:
            first = next(i for i, m in enumerate(history) if m["role"] != "system")
            later = [i for i, m in enumerate(history) if m["role"] == "user" and i > first]
            if not later:
                err.print(f"[red]error:[/red] {e}")
                return None
            del history[first : later[0]]
            err.print("[dim]older turns dropped to fit the model's context[/dim]")
        except ValueError as e:  # anything else wrong with this turn: say so, keep the chat
            err.print(f"[red]error:[/red] {e}")
            return None


def _generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="a system message (through the model's chat template)")
    p.add_argument(
        "--image-tokens", type=int, default=None, choices=(70, 140, 280, 560, 1120),
        help="soft tokens per image (default 280); more reads small text better and costs prefill time",
    )  # fmt: skip
    p.add_argument(
        "--mmproj", default=None, metavar="FILE",
        help="a .gguf model's image / audio towers: llama.cpp's mmproj file (default: an mmproj*.gguf beside it)",
    )  # fmt: skip
    _model_options(p)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--quant", default=None, help=QUANT_HELP)
    p.add_argument("--quant-towers", action="store_true", help=QUANT_TOWERS_HELP)
    p.add_argument(
        "--draft", type=_draft_choice, default="off", metavar="auto|lookup|off|MODEL",
        help="speculative decoding (same output, faster): 'lookup' drafts from the prompt and the reply so far "
        "(pays when the reply quotes its context); MODEL, a Gemma 4 -assistant drafter (a folder or a stored "
        "name); 'auto', the model's -assistant drafter when it is in the store, else lookup; default off",
    )  # fmt: skip
    _expert_options(p)


def _expert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-budget", default=None, metavar="BUDGET", help=BUDGET_HELP)
    p.add_argument("--no-moe-profile", action="store_true", help="ignore the model's moe_profile.json")
    p.add_argument(
        "--private-reads", choices=("auto", "on", "off"), default="auto",
        help="with --expert-budget: read cold experts into private memory, keeping them out of the page cache, "
        "where other processes could see which experts ran (docs/privacy.md); auto (default): on when other "
        "users can read the checkpoint",
    )  # fmt: skip
    p.add_argument(
        "--fixed-shape", action="store_true",
        help="with --expert-budget: every MoE layer reads the same number of experts per token (padded with "
        "decoys), so that I/O counters and timing do not follow the routing; costs decode speed",
    )  # fmt: skip


def _privacy(args: argparse.Namespace):
    """The routing-privacy switches of run/chat/serve as LLM's `privacy`, refused now if they need a budget that
    is not given (a server that loads models on first use would fail only then)."""
    from .moe.options import PrivacyOptions, check

    options = PrivacyOptions(args.private_reads, args.fixed_shape, getattr(args, "isolate_clients", False))
    check(options, args.expert_budget)
    return options


DRAFT_CHOICES = ("auto", "lookup", "off")  # engine/speculative.py's names (not imported here: it pulls in torch)


def _draft_choice(value: str) -> str:
    """--draft: a name, or a drafter model (a folder, or a name in the store) as its folder."""
    if value in DRAFT_CHOICES:
        return value
    from .store import ModelNotFoundError, resolve

    try:
        return str(resolve(value))
    except ModelNotFoundError as e:
        names = ", ".join(repr(c) for c in DRAFT_CHOICES)
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r}: choose {names}, or a drafter model ({e})"
        ) from None


BUDGET_HELP = (
    "MoE models: keep experts in the checkpoint and at most this much of them in memory: bytes (6GB, 512MB) or a "
    "share of all expert bytes (0.25, 25%%)"
)
QUANT_HELP = "quantize the weights while loading: int8, int4 (int4-g32 / -g64 / -g128 set the group size)"
QUANT_TOWERS_HELP = (
    "quantize the image / audio towers' linear layers too, in the --quant format (default: the towers keep their "
    "precision; docs/multimodal.md measures what quantized towers lose)"
)


def _quantize(args: argparse.Namespace) -> int:
    from .api import LLM
    from .weights.export import write_quantized

    llm = LLM(args.model, dtype=args.dtype, quant=args.to, quant_towers=args.quant_towers)
    out = Path(args.output)
    if out.exists() and out.resolve() == llm.path.resolve():
        raise ValueError(f"{out}: write the quantized checkpoint to a new folder, not over its source")
    _staged(out, lambda folder: write_quantized(llm.model, llm.path, folder, llm.quant, llm.tower_quant))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e9
    _err().print(f"wrote {out} ({llm.quant}, {size:.2f} GB); run it with `hearth run {out}`")
    return 0


def _staged(out: Path, write) -> None:
    """`write(folder)` into a hidden folder beside `out`, moved into `out` once whole: a failure (a full disk)
    leaves no partial model behind, under `out` or in the store."""
    import errno
    import os
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(stage)
        out.mkdir(exist_ok=True)
        for f in sorted(stage.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
            if (out / f.name).is_dir():
                shutil.rmtree(out / f.name)
            os.replace(f, out / f.name)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ValueError(f"no space left on the device holding {out.parent} ({e.strerror}): nothing was written; "
                         "free some space and run the command again") from None  # fmt: skip
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _pull(args: argparse.Namespace) -> int:
    from . import store

    err = Console(stderr=True, soft_wrap=True)
    try:
        folder = store.pull(args.id, args.revision, console=err, text_only=args.text_only)
        drafter = store.pull_draft(args.id, console=err) if args.with_draft else None
    except KeyboardInterrupt:
        err.print(f"interrupted: run `hearth pull {args.id}` again to resume", highlight=False)
        raise
    entry = store.ModelEntry(args.id, folder, "pulled")
    short = args.id.rsplit("/", 1)[-1]
    err.print(
        f"pulled {args.id} ({store.human_size(entry.size())}, input: {entry.inputs()}) into {folder}", highlight=False
    )
    if drafter is not None:
        err.print(f"pulled its drafter {store.draft_repo(args.id)} into {drafter}", highlight=False)
    err.print(f"run it: hearth run {short} PROMPT" + (" --draft auto" if drafter else ""), highlight=False)
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from . import store

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "SIZE", "FAMILY", "FORMAT", "INPUT", "WHERE"):
        table.add_column(col, no_wrap=True)
    for e in store.list_models():
        name = f"{e.name} (built-in)" if e.kind == "built-in" else e.name
        where = str(e.path).replace(str(Path.home()), "~", 1)
        table.add_row(name, store.human_size(e.size()), e.family(), e.format(), e.inputs(), where)
    out = Console() if sys.stdout.isatty() else Console(width=400)  # piped: whole paths, no wrapping
    if table.row_count:
        out.print(table, highlight=False)
    else:
        out.print(f"no models in {store.store_root()}: `hearth pull ID` downloads one", highlight=False)
    return 0


def _rm(args: argparse.Namespace) -> int:
    from . import store

    path = store.remove(args.name)
    Console(stderr=True, soft_wrap=True).print(f"removed {path}", highlight=False)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from . import server
    from .distributed.mesh import launched

    mesh = None
    ranks, how = _split(args)
    if ranks > 1 or launched():  # `--tp N` / `--ep N` / `--pp N`, or one of the ranks it (or torchrun) started
        from .distributed import follow, run

        follow.check_serve(args.model, _draft(args), args.expert_budget, how)
        if not launched():
            _check_split(args.model, ranks, how)
            return run.serve_ranks(ranks, args.argv)
        mesh = run.join_ranks(args.device, how)
        if not mesh.first:
            return follow.serve_follower(mesh, args.model, args.dtype, args.quant, args.max_running, args.kv_blocks,
                                         args.device, args.expert_budget, _privacy(args))  # fmt: skip
    key = args.api_key or os.environ.get("HEARTH_API_KEY") or None
    web = {k: v for k, v in (("allowed_hosts", args.allowed_hosts), ("cors_origins", args.cors_origins)) if v}
    try:
        server.serve(
            args.model, args.host, args.port, key, args.dtype, args.quant, args.max_running, args.kv_blocks,
            expert_budget=args.expert_budget, moe_profile=not args.no_moe_profile, keep_alive=args.keep_alive,
            max_memory=args.max_memory, image_tokens=args.image_tokens, draft=_draft(args), device=args.device,
            privacy=_privacy(args), quant_towers=args.quant_towers, mesh=mesh, **web,
        )  # fmt: skip
    finally:
        if mesh is not None:  # a process group left open aborts the interpreter at exit
            from .distributed.mesh import close

            close()
    return 0


def _check_split(model: str | None, ranks: int, how: str) -> None:
    """Refuse a split that `model` cannot take (heads, experts or layers that do not divide among the ranks) here,
    from its config on the meta device, before any rank starts: each rank would find it only once it had loaded."""
    from . import fit
    from .distributed.pipeline import PipelineError
    from .distributed.tensor_parallel import TensorParallelError

    try:
        fit.load(model, ranks, how)
    except (PipelineError, TensorParallelError):
        raise
    except Exception:  # noqa: BLE001  (an early check only: the ranks load it and report what else is wrong)
        return


def _fit(args: argparse.Namespace) -> int:
    from . import fit

    low = [flag for flag in ("tp", "ep", "pp") if getattr(args, flag) < 1]
    if low:
        raise ValueError(f"--{low[0]} must be at least 1 (got {getattr(args, low[0])})")
    ranks, how = _split(args)
    machine = fit.detect(args.ram, args.vram, args.bandwidth)
    estimates = fit.fit(
        args.models or None, machine, args.context, args.concurrency, images=args.images,
        image_tokens=args.image_tokens, audio_clips=args.audio_clips, quant_towers=args.quant_towers, tp=ranks,
        split=how,
    )  # fmt: skip
    if args.json:
        sys.stdout.write(fit.to_json(estimates, machine) + "\n")
    else:
        (Console() if sys.stdout.isatty() else Console(width=200)).print(fit.table(estimates, machine))
    return 0


def _moe_profile(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .api import LLM, SamplingParams
    from .moe import profile

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts (one per line)")
    llm = LLM(args.model, dtype=args.dtype, quant=args.quant, expert_budget=args.expert_budget, moe_profile=False)
    if not llm.config.num_experts:
        raise ValueError(f"{llm.path}: not a mixture-of-experts model")
    recorder = profile.Recorder(llm.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    chat = llm.tokenizer is not None and llm.tokenizer.has_chat_template
    with Progress(console=_err(), transient=True) as progress:
        task = progress.add_task("profiling expert usage", total=len(prompts))
        for prompt in prompts:
            if chat:
                llm.chat([{"role": "user", "content": prompt}], params)
            else:
                llm.generate(prompt, params)
            progress.advance(task)
    recorder.close()
    out = profile.write(llm.path, recorder.to_json(llm.path.name))
    _err().print(f"wrote {out} ({recorder.tokens} tokens); budgeted runs of this model now start from it")
    return 0


def _split_options(p: argparse.ArgumentParser, serving: str) -> None:
    """--tp N, --ep N and --pp N of `run` and `serve` (`serving`: what the help adds for a server)."""
    helps = {
        "tp": f"tensor parallelism: split the model over N local processes{serving}; each expert of an MoE model is "
        "split by its width (docs/distributed.md)",
        "ep": "expert parallelism: as --tp N, with an MoE model's experts divided among the N processes",
        "pp": f"pipeline parallelism: split the layers over N local processes{serving} (docs/distributed.md)",
    }
    for flag, text in helps.items():
        p.add_argument(f"--{flag}", type=_ranks, default=1, metavar="N", help=text)


def _split(args: argparse.Namespace) -> tuple[int, str]:
    """(ranks, how the model splits: "tp", "ep" or "pp") from --tp N / --ep N / --pp N."""
    from .distributed.run import split_of

    return split_of(getattr(args, "tp", 1), getattr(args, "ep", 1), getattr(args, "pp", 1))


def _ranks(text: str) -> int:
    """--tp's value: a whole number of ranks, 1 or more."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ranks: give a whole number, 1 or more")
    return n


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _privacy_audit(args: argparse.Namespace) -> int:
    import json

    from rich.progress import Progress

    from .privacy import audit, pad_experts, report
    from .store import resolve

    model = args.model or "hearth-demo-moe"
    if args.pad_experts:
        src = resolve(model)
        name = f"{src.name}-{args.pad_experts:g}mb" + "-owner" * args.owner_only
        model = pad_experts(src, Path(args.pad_dir) / name, args.pad_experts, args.owner_only)
        mode = "only its owner" if args.owner_only else "every user"
        _err().print(
            f"auditing {model}: {src.name} with its experts zero-padded to {args.pad_experts:g} MB each, "
            f"readable by {mode}"
        )
    results = []
    with Progress(console=_err(), transient=True) as progress:
        for mitigations in args.mitigations or [None]:
            results += audit(
                model, args.expert_budget, mitigations, tuple(args.attackers), args.topics, args.per_topic,
                args.max_tokens, progress, args.evict,
            )  # fmt: skip
    if args.json:
        print(json.dumps(report.rows(results), indent=1))
    else:
        title = f"routing privacy of {Path(str(model)).name}, expert budget {args.expert_budget}"
        (Console() if sys.stdout.isatty() else Console(width=200)).print(report.table(results, title))
    return 0


def _csv(text: str) -> list[str | None]:
    return [None if x.strip().lower() == "none" else x.strip() for x in text.split(",") if x.strip()]


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.plot:
        bench.plot_check()  # before minutes of measuring, not after
    result = bench.bench(
        args.models or None, args.dtype, args.quant, args.prompt_len, args.gen_len, args.runs, args.vs or [],
        args.device, args.bandwidth, progress=True, expert_budget=args.expert_budget, draft=args.draft,
    )  # fmt: skip
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        (Console() if sys.stdout.isatty() else Console(width=200)).print(bench.table(result))
    if args.plot:
        _err().print(f"wrote {bench.plot(result, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Run LLMs locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "a pulled model (HF id or short name), a checkpoint folder or a .gguf file; default: the demo model"
    run = sub.add_parser("run", help="answer one prompt, streamed (through the chat template, unless --raw)")
    run.add_argument("model", nargs="?", help=model_help)
    run.add_argument("prompt", nargs="?", help="the prompt (read from stdin when piped)")
    run.add_argument("--raw", action="store_true", help="complete the prompt as plain text, without the chat template")
    run.add_argument(
        "--moe-stats", action="store_true", help="print expert hit rate and bytes fetched after the answer"
    )
    run.add_argument(
        "--image", action="append", metavar="FILE", help="an image for the model to see (PNG, JPEG, WebP, GIF); repeat "
        "for several",
    )  # fmt: skip
    run.add_argument(
        "--audio", action="append", metavar="FILE", help="an audio clip for the model to hear (WAV, FLAC, MP3); repeat "
        "for several",
    )  # fmt: skip
    _split_options(run, "")
    _generation_options(run)
    run.set_defaults(func=_run)
    chat = sub.add_parser("chat", help="talk to a model, turn by turn")
    chat.add_argument("model", nargs="?", help=model_help)
    _generation_options(chat)
    chat.set_defaults(func=_chat)
    serve = sub.add_parser("serve", help="serve models over the OpenAI, Ollama and Anthropic HTTP APIs")
    serve.add_argument(
        "model", nargs="?",
        help="serve this model alone, loaded at start (default: every model `hearth list` shows, each loaded when "
        "a request names it)",
    )  # fmt: skip
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument(
        "--port", type=int, default=11434, help="default 11434, Ollama's, so Ollama clients need no setting"
    )
    serve.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' (default: $HEARTH_API_KEY); KEY1,KEY2,...: one key per client, "
        "which --isolate-clients keeps apart",
    )  # fmt: skip
    serve.add_argument(
        "--allowed-hosts", type=_names, default=None, metavar="NAMES",
        help="Host names the server answers besides localhost, 127.0.0.1 and [::1] (comma list; '*': any), e.g. "
        "behind a reverse proxy; on a non-loopback --host, unset means any",
    )  # fmt: skip
    serve.add_argument(
        "--cors-origins", type=_names, default=None, metavar="ORIGINS",
        help="web origins allowed to call the server from a browser (comma list, e.g. https://app.example; '*': "
        "any); default: none but this machine's own pages",
    )  # fmt: skip
    serve.add_argument(
        "--max-running", type=int, default=None,
        help="the most requests generated at once; more wait in order (default: as many as the KV cache holds)",
    )  # fmt: skip
    serve.add_argument("--max-batch", type=int, dest="max_running", help=argparse.SUPPRESS)  # the old name
    serve.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks (default: the engine's choice)")
    serve.add_argument(
        "--keep-alive", default=None,
        help="with no model named: how long a model stays loaded after its last request ('5m', '1h', seconds; "
        "0: unload at once; negative: forever; default 5m; a request's keep_alive overrides it)",
    )  # fmt: skip
    serve.add_argument(
        "--max-memory", default=None,
        help="with no model named: memory loaded models may hold together ('12GB'); past it, the least recently "
        "used idle model unloads (default: this machine's RAM, or its GPU's memory, as `hearth fit` reads them)",
    )  # fmt: skip
    serve.add_argument(
        "--image-tokens", type=int, default=None, choices=(70, 140, 280, 560, 1120),
        help="soft tokens per image when a request does not say (default 280); more reads small text better",
    )  # fmt: skip
    serve.add_argument(
        "--isolate-clients", action="store_true",
        help="with --expert-budget: one client's requests never share the expert pool with another's (clients told "
        "apart by their bearer token, else their address; docs/privacy.md); costs batching across clients",
    )  # fmt: skip
    _split_options(serve, ", rank 0 serving HTTP (needs MODEL)")
    _model_options(serve)
    serve.set_defaults(func=_serve)
    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub (with its vision and audio towers)")
    pull.add_argument("id", help="a Hugging Face repo id, e.g. google/gemma-4-E2B-it")
    pull.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    pull.add_argument(
        "--text-only", action="store_true",
        help="leave the vision and audio towers behind (their tensors are cut out of shared files): a smaller "
        "download that takes text only",
    )  # fmt: skip
    pull.add_argument(
        "--with-draft", action="store_true",
        help="also pull the model's speculative-decoding drafter, ID-assistant (Gemma 4's MTP drafters, e.g. "
        "google/gemma-4-E2B-it-assistant), which `--draft auto` then uses",
    )  # fmt: skip
    pull.set_defaults(func=_pull)
    quant = sub.add_parser("quantize", help="write a quantized copy of a model that loads without quantizing again")
    quant.add_argument("model", help=model_help.split(";")[0])
    quant.add_argument("--to", required=True, help="int8, int4, int4-g32, int4-g64 or int4-g128")
    quant.add_argument("-o", "--output", required=True, help="the folder to write")
    quant.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="of the float tensors")
    quant.add_argument("--quant-towers", action="store_true", help=QUANT_TOWERS_HELP.replace("--quant", "--to"))
    quant.set_defaults(func=_quantize)
    prof = sub.add_parser("moe-profile", help="record which experts an MoE model uses, to seed --expert-budget")
    prof.add_argument("model", nargs="?", help=model_help)
    prof.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    prof.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    prof.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    prof.add_argument("--quant", default=None, help=QUANT_HELP)
    prof.add_argument("--expert-budget", default=None, metavar="BUDGET", help=BUDGET_HELP)
    prof.set_defaults(func=_moe_profile)
    pa = sub.add_parser("privacy-audit", help="measure what an MoE model's expert use tells each attacker model")
    pa.add_argument("model", nargs="?", help=model_help.replace("the demo model", "the demo MoE model"))
    pa.add_argument("--expert-budget", default="25%", metavar="BUDGET", help=BUDGET_HELP + " (default 25%%)")
    pa.add_argument("--mitigations", action="append", metavar="LIST",
                    help="switches to audit with, e.g. private_reads,fixed_shape or isolate or noise=2, or defaults "
                         "(what `hearth run --expert-budget` does unasked); repeat the option to compare several "
                         "sets (default: none)")  # fmt: skip
    pa.add_argument("--attackers", type=lambda t: t.upper().split(","), default=["A1", "A2", "A3", "A4"],
                    help="a comma list of A1-A4 (default: all)")  # fmt: skip
    pa.add_argument("--topics", default=None, help='a JSON file {"topics": {name: [prompt, ...]}} (default: built in)')
    pa.add_argument("--per-topic", type=int, default=None, help="prompts per topic (default: all)")
    pa.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    pa.add_argument("--pad-experts", type=float, default=None, metavar="MB",
                    help="audit a copy with experts zero-padded to MB each (realistic page-cache behaviour)")  # fmt: skip
    pa.add_argument("--pad-dir", default="/var/tmp/hearthlm-privacy", help="where the padded copy goes")
    pa.add_argument("--owner-only", action="store_true",
                    help="make the padded copy readable by its owner only (0600 in a 0700 folder), as `hearth pull` "
                         "stores models (default: readable by every user, the setting A1 needs)")  # fmt: skip
    pa.add_argument("--evict", action="store_true",
                    help="empty the page cache of the checkpoint before each request, as memory pressure on a "
                         "file larger than the free memory would (the worst case for A2)")  # fmt: skip
    pa.add_argument("--json", action="store_true", help="print the results as JSON")
    pa.set_defaults(func=_privacy_audit)
    sub.add_parser("list", help="list the models on this machine").set_defaults(func=_list)
    rm = sub.add_parser("rm", help="remove a pulled model")
    rm.add_argument("name", help="its HF id or short name (see `hearth list`)")
    rm.set_defaults(func=_rm)
    fit = sub.add_parser("fit", help="which models and formats fit this machine, and how fast they decode")
    fit.add_argument("models", nargs="*", metavar="MODEL", help=model_help.split(";")[0] + "; default: known models")
    fit.add_argument("--ram", type=float, default=None, help="host memory in GB (default: this machine's)")
    fit.add_argument("--vram", type=float, default=None, help="GPU memory in GB (default: this machine's GPUs)")
    fit.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    fit.add_argument("--concurrency", type=int, default=1, help="sequences decoded together (default 1)")
    fit.add_argument(
        "--images", type=int, default=0, help="images per sequence: counts the vision tower and their tokens' KV"
    )
    fit.add_argument(
        "--image-tokens", type=int, default=280, choices=(70, 140, 280, 560, 1120), help="soft tokens per image"
    )
    fit.add_argument("--audio-clips", type=int, default=0, help="30-second audio clips per sequence (the audio tower)")
    fit.add_argument(
        "--quant-towers", action="store_true", help="price the towers' linear layers in int8 / int4 in those formats"
    )
    fit.add_argument("--bandwidth", type=float, default=None, help="memory read bandwidth in GB/s (default: measured)")
    fit.add_argument("--tp", type=int, default=1, metavar="N",
                     help="per rank of `hearth serve --tp N` (--ram, --vram: one rank's machine)")  # fmt: skip
    fit.add_argument("--ep", type=int, default=1, metavar="N", help="per rank of `hearth serve --ep N`")
    fit.add_argument("--pp", type=int, default=1, metavar="N", help="per rank of `hearth serve --pp N`")
    fit.add_argument("--json", action="store_true", help="print the estimates as JSON")
    fit.set_defaults(func=_fit)
    b = sub.add_parser("bench", help="measure prefill and decode speed, time to first token and peak memory")
    b.add_argument("models", nargs="*", metavar="MODEL", help=model_help + " (several: side by side)")
    b.add_argument("--dtype", type=_csv, default=None, help="float32, bfloat16, float16; a comma list compares them")
    b.add_argument("--quant", type=_csv, default=None, help="weight formats (comma list; 'none': unquantized)")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    b.add_argument("--gen-len", type=int, default=32, help="tokens generated per run (default 32)")
    b.add_argument("--runs", type=int, default=3, help="counted runs after a warm-up; figures are medians")
    b.add_argument("--vs", action="append", choices=["transformers", "llama.cpp"], help="also run this engine")
    b.add_argument("--device", default=None, help="cpu (default) or cuda")
    b.add_argument("--bandwidth", type=float, default=None, help="memory read bandwidth in GB/s (default: measured)")
    b.add_argument("--json", action="store_true", help="print the result rows as JSON")
    b.add_argument("--plot", metavar="FILE", default=None, help="write a PNG bar chart (needs matplotlib)")
    b.add_argument("--expert-budget", default=None, metavar="BUDGET", help=BUDGET_HELP)
    b.add_argument(
        "--draft", type=_draft_choice, default=None, metavar="auto|lookup|MODEL",
        help="also measure hearthlm with speculative decoding by this drafter: a row with it beside the row without",
    )  # fmt: skip
    b.set_defaults(func=_bench)
    for p in (run, chat, serve):
        p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: HEARTHLM_DEVICE, else cpu)")
    for p in (run, chat, serve, b):
        _threads_option(p)
    return parser


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="threads for the model's compute (default: HEARTHLM_THREADS, else the physical cores)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what `--tp N` starts again as N ranks
    try:
        if getattr(args, "threads", None) is not None:
            from .kernels.cpu import set_threads

            set_threads(args.threads)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
