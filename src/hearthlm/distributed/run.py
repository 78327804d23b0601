"""Launchers and the distributed entry point.

    python -m hearthlm.distributed.run MODEL --prompt TEXT --max-tokens N --tp 2     # starts 2 local ranks
    python -m hearthlm.distributed.run MODEL --prompt TEXT --max-tokens N --pp 2     # layers split over 2 (pipeline.py)
    torchrun --nproc-per-node 2 -m hearthlm.distributed.run MODEL --prompt TEXT     # torchrun starts them

Every rank runs the same program: it loads the model, keeps its share (tensor_parallel.py) and makes the same
engine calls in the same order, so the collectives inside the forward pair up; rank 0 prints. `launch` is what
`--tp N` (here and in `hearth run`) uses: N copies of a command with torchrun's environment, loopback
rendezvous, and the cores shared among them. A rank that exits with an error stops the others.
`hearth serve MODEL --tp N` starts its ranks with serve_ranks: there rank 0 serves and the others follow its
engine (follow.py) instead of running the same program.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import mesh as meshes

USAGE = 2  # the exit code of a refused command (hearth's usage errors): every rank refuses the same arguments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's variables for one local rank, and its share of the cores (unless HEARTHLM_THREADS is set)."""
    from ..kernels.cpu import physical_cores

    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("HEARTHLM_THREADS", str(max(1, physical_cores() // world)))
    return env


def launch(world: int, argv: list[str], quiet: bool = True, serving: bool = False) -> int:
    """Run `argv` as `world` local ranks and wait; returns 0, or the exit code of the first rank that failed
    (the others are then stopped: they would wait for it in their next collective). `quiet`: ranks other
    than 0 print nothing to stdout, and their stderr shows only if they fail. `serving`: the ranks of a server
    (serve_ranks), in a session of their own: SIGTERM and SIGINT to the launcher go to rank 0 alone, which stops
    the others itself."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hearthlm-ranks-") as logs:
        errs = [None] + [open(Path(logs) / f"rank{r}.err", "w+") for r in range(1, world)]  # noqa: SIM115
        out = subprocess.DEVNULL if quiet else None
        procs = [
            subprocess.Popen(
                argv,
                env=rank_env(r, world, port),
                stdout=None if r == 0 else out,
                stderr=errs[r],
                start_new_session=serving,
            )  # fmt: skip
            for r in range(world)
        ]
        before = _forward_signals(procs[0]) if serving else {}
        try:
            rank, code = _wait(procs)
            if code == USAGE and _ends_with(procs[0], USAGE):
                rank = 0  # every rank refused the same arguments, and rank 0 has said why
        finally:
            _stop(procs)
            for signum, handler in before.items():
                signal.signal(signum, handler)
        if code and rank > 0:  # rank 0 printed its own errors; show the failed rank's
            errs[rank].seek(0)
            sys.stderr.write(errs[rank].read()[-4000:])
        for f in errs[1:]:
            f.close()
    if code and (rank, code) != (0, USAGE):
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"error: rank {rank} of {world} {how}; the other ranks were stopped", file=sys.stderr)
    return code if code >= 0 else 128 - code


def _ends_with(proc: subprocess.Popen, code: int, grace: float = 10.0) -> bool:
    """Whether `proc` exits with `code` within `grace` seconds."""
    try:
        return proc.wait(timeout=grace) == code
    except subprocess.TimeoutExpired:
        return False


def _forward_signals(first: subprocess.Popen) -> dict:
    """SIGTERM and SIGINT to this process go on to rank 0 (a server's ranks run in their own session, away from
    the terminal's Ctrl-C); the handlers they replace are returned."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    forward = lambda signum, frame: first.poll() is None and first.send_signal(signum)  # noqa: E731
    return {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}


def _stop(procs: list[subprocess.Popen], grace: float = 60.0) -> None:
    """Terminate the ranks still running; kill those that are still there after `grace` seconds (a server's rank
    0 lets its open requests finish first)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(procs: list[subprocess.Popen], linger: float = 30.0) -> tuple[int, int]:
    """(rank, exit code) of the first rank that failed, else (0, 0) once all have ended. Ranks still running
    `linger` seconds after rank 0 ended well count as failed (code 1): rank 0 told them to stop."""
    ended = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            return failed[0]
        if all(c == 0 for c in codes):
            return 0, 0
        if codes[0] == 0:
            ended = ended or time.monotonic()
            if time.monotonic() - ended > linger:
                rank = next(r for r, c in enumerate(codes) if c is None)
                print(f"error: rank {rank} did not stop within {linger:.0f} s after rank 0 ended", file=sys.stderr)
                return rank, 1
        time.sleep(0.05)


def relaunch(world: int, module: str, args: list[str]) -> int:
    """`python -m module args` as `world` local ranks (the --tp path of this entry and of `hearth run`)."""
    return launch(world, [sys.executable, "-m", module, *args])


def split_of(tp: int, ep: int, pp: int = 1) -> tuple[int, str]:
    """(how many ranks, how the model splits: "tp", "ep" or "pp") from --tp N, --ep N and --pp N. --ep N splits
    attention and dense MLPs as --tp N does and divides the routed experts among the ranks; --tp N splits each
    expert's width; --pp N splits the layers (pipeline.py)."""
    asked = [(n, how) for n, how in ((tp, "tp"), (ep, "ep"), (pp, "pp")) if n > 1]
    if len(asked) > 1:
        raise ValueError(
            f"give one of --tp N, --ep N and --pp N, not {' and '.join('--' + how for _, how in asked)}: --ep N "
            "already splits attention as --tp N does, and --tp with --pp is not available yet"
        )
    return asked[0] if asked else (1, "tp")


def strip_tp(argv: list[str]) -> list[str]:
    """argv without its --tp option (the ranks started for it must not start ranks again). --ep stays: the ranks
    read how to split the experts from it, and a started rank never starts ranks (`launched()`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--tp":
            skip = True
        elif not a.startswith("--tp="):
            out.append(a)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hearthlm.distributed.run", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a checkpoint folder, .gguf file or pulled model name")
    p.add_argument("--prompt", default=None, help="text, completed as is (no chat template)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quant", default=None)
    p.add_argument("--tp", type=int, default=1, help="start this many local ranks (without torchrun)")
    p.add_argument("--ep", type=int, default=1, help="as --tp, with routed experts divided among the ranks")
    p.add_argument("--pp", type=int, default=1, help="split the layers over this many local ranks (pipeline.py)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    ranks, how = split_of(args.tp, args.ep, args.pp)
    if ranks > 1 and not meshes.launched():  # the ranks keep --ep / --pp: they tell them how to split
        return relaunch(ranks, "hearthlm.distributed.run", strip_tp(argv))
    from ..api import LLM, SamplingParams

    mesh = meshes.init(split=how) if meshes.launched() else meshes.Mesh(0, 1, split=how)
    llm = LLM(args.model, dtype=args.dtype, quant=args.quant, device=str(mesh.device()), mesh=mesh)
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise ValueError("give --prompt TEXT or --prompt-ids 1,2,3")
    seed = mesh.shared_int(args.seed)  # every rank must draw the same tokens
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=seed, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    seconds = time.perf_counter() - start
    if mesh.first:
        print(out.text if llm.tokenizer is not None else "", flush=True)
        print(f"tokens: {out.token_ids}", flush=True)
        print(f"ranks: {mesh.world}  {len(out.token_ids)} tokens in {seconds:.2f} s", file=sys.stderr)
    meshes.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run_ranks(world: int, argv: list[str], prompt: str | None) -> int:
    """`hearth run ... --tp N`: the same command as N local ranks. A prompt read from stdin is passed on the
    command line, since only one process could read it."""
    args = strip_tp(argv)
    if prompt is not None and prompt not in args:
        args.append(prompt)
    return relaunch(world, "hearthlm.cli", args)


def serve_ranks(world: int, argv: list[str]) -> int:
    """`hearth serve MODEL ... --tp N`: the same command as N local ranks; rank 0 serves HTTP, the others follow
    its engine (follow.py). SIGTERM or Ctrl-C to this process stops rank 0, which stops the others."""
    return launch(world, [sys.executable, "-m", "hearthlm.cli", *strip_tp(argv)], serving=True)


def join_ranks(device: str | None, split: str = "tp") -> meshes.Mesh | None:
    """In a process started as a rank: join the group (None otherwise); `split` as in Mesh. Ranks other than 0
    print nothing to stdout: the reply is rank 0's to print."""
    if not meshes.launched():
        return None
    mesh = meshes.init(device, split)
    if not mesh.first:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return mesh
