"""`hearth` command line: parses arguments, then calls the Python API."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console


def _run(args: argparse.Namespace) -> int:
    from .api import LLM, SamplingParams

    err = Console(stderr=True, soft_wrap=True)
    llm = LLM(args.model, dtype=args.dtype)
    if llm.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: `hearth run` needs one to read the prompt")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
    )
    out: list[int] = []
    shown = ""
    first: list[float] = []
    start = time.perf_counter()

    def on_token(_: int, token: int) -> None:
        nonlocal shown
        if not first:
            first.append(time.perf_counter() - start)
        out.append(token)
        text = llm.tokenizer.decode(out)
        # Hold back text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
        if not text.endswith("\ufffd") and text.startswith(shown):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    completion = llm.generate(args.prompt, params, on_token=on_token)[0]
    if completion.text.startswith(shown):
        sys.stdout.write(completion.text[len(shown) :])
    sys.stdout.write("\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - start
    n = completion.usage.completion_tokens
    if n and first:
        rate = (n - 1) / (elapsed - first[0]) if n > 1 and elapsed > first[0] else 0.0
        err.print(f"[dim]{n} tokens, {rate:.1f} tokens/s, time to first token {first[0] * 1000:.0f} ms[/dim]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Run LLMs locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate a completion for one prompt, streamed")
    run.add_argument("model", help="a local checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    run.add_argument("prompt")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--min-p", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
