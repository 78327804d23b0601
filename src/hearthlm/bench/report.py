"""`hearth bench` output for humans: a rich table and a PNG chart."""

from __future__ import annotations

from pathlib import Path

from .results import BenchError, Result, Row

# -- output -------------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _format(r: Row) -> str:
    if r.path.endswith(".gguf"):  # the file's types; hearthlm holds its float tensors in the dtype
        fmt = "gguf" if r.engine != "hearthlm" else f"gguf ({r.dtype})"
    else:
        fmt = r.quant or r.dtype
    fmt += f", experts {r.expert_budget}" if r.expert_budget else ""
    return fmt + (f", draft {_draft_name(r.draft)}" if r.draft else "")


def _draft_name(draft: str) -> str:
    return Path(draft).name if "/" in draft else draft


def _off(r: Row, rows: list[Row]) -> Row | None:
    """The row without drafting that row `r` (with drafting) compares with."""
    return next(
        (
            o
            for o in rows
            if not o.draft and (o.path, o.engine, o.dtype, o.quant) == (r.path, r.engine, r.dtype, r.quant)
        ),
        None,
    )


def table(result: Result):
    """A rich Table: one row per model/engine/format, then the ratios."""
    from rich.table import Table

    quality = any(r.quality for r in result.rows)
    bw = result.machine.get("bandwidth_gbps")
    s = result.settings
    title = f"prompt {s['prompt_len']} tokens, {s['gen_len']} generated, median of {s['runs']} runs" + (
        f"; roofline at {bw:.1f} GB/s" if bw else ""
    )
    t = Table(title=title, box=None, header_style="bold")
    columns = ["MODEL", "ENGINE", "FORMAT", "TTFT", "PREFILL TOK/S", "DECODE TOK/S", "(MIN–MAX)", "ROOFLINE"]
    columns += ["PEAK MEM", "FIT EST."] + (["KL", "TOP-1"] if quality else [])
    moe = any(r.moe for r in result.rows)
    columns += ["EXPERT HITS", "FETCHED/TOK", "FETCH TIME"] if moe else []
    draft = any(r.draft for r in result.rows)
    columns += ["ACCEPTED", "DECODE VS OFF"] if draft else []
    for c in columns:
        t.add_column(c, no_wrap=True, justify="left" if c in ("MODEL", "ENGINE", "FORMAT") else "right")
    for r in result.rows:
        d = r.decode_tok_s
        cells = [r.model, r.engine, _format(r), f"{r.ttft_s.median * 1000:.0f} ms"]
        cells += [f"{r.prefill_tok_s.median:.1f}", f"{d.median:.1f}", f"{d.min:.1f}–{d.max:.1f}"]
        cells += [f"{100 * r.roofline_fraction:.0f}%" if r.roofline_fraction else "—"]
        cells += [_mb(r.peak_memory), _mb(r.fit_memory)]
        if quality:
            q = r.quality
            cells += [f"{q.kl_mean:.4f}", f"{100 * q.top1_agreement:.1f}%"] if q else ["", ""]
        if moe:
            m = r.moe
            cells += (
                [f"{m['hit_rate']:.1%}", f"{m['mb_per_token']:.2f} MB", f"{m['fetch_share']:.0%}"] if m else [""] * 3
            )
        if draft:
            cells += _draft_cells(r, result.rows)
        t.add_row(*cells)
    for x in result.ratios:
        mem = f"{x.peak_memory:.2f}×" if x.peak_memory else "—"
        cells = [x.model, f"hearthlm / {x.versus}", x.dtype, f"{x.ttft:.2f}×", f"{x.prefill:.2f}×"]
        cells += [f"{x.decode:.2f}×", "", "", mem, ""] + (["", ""] if quality else []) + ([""] * 3 if moe else [])
        cells += ["", ""] if draft else []
        t.add_row(*cells, style="bold")
    t.caption = _caption(moe, draft)
    return t


def _caption(moe: bool, draft: bool) -> str:
    text = (
        "TTFT: prefill + first token. Decode: tokens after the first / time after the first. ROOFLINE: decode as a "
        "share of bandwidth / bytes per token. PEAK MEM: peak RSS over the imports (VRAM on CUDA); FIT EST.: "
        "`hearth fit`'s estimate of it. Ratios > 1: hearthlm's figure is higher (better for tok/s, worse for TTFT "
        "and memory)."
    )
    if moe:
        text += (
            " EXPERT HITS: share of expert uses served from the pool; FETCHED/TOK: expert bytes read from the slow tier "
            "per token (prompt included); FETCH TIME: share of the run spent waiting on them."
        )
    if draft:
        text += (
            " ACCEPTED: draft tokens the model kept / drafted (speculative decoding; the output is the same); DECODE "
            "VS OFF: decode tok/s with the drafter / without it."
        )
    return text


def _draft_cells(r: Row, rows: list[Row]) -> list[str]:
    off = _off(r, rows) if r.draft else None
    if off is None:
        return ["", ""]
    accepted = f"{r.acceptance:.0%}" if r.acceptance is not None else "none drafted"
    return [accepted, f"{r.decode_tok_s.median / off.decode_tok_s.median:.2f}×"]


def plot_check() -> None:
    """Raise BenchError unless matplotlib can be imported (checked before the benchmark runs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or pip install 'hearthlm[plot]')") from None


def plot(result: Result, path: str | Path) -> Path:
    """A PNG bar chart: decode and prefill tok/s (medians) per model/engine/format."""
    plot_check()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.model}\n{r.engine} {_format(r)}" for r in result.rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(labels)) * 2, 4.5))
    for ax, key, title in zip(axes, ("decode_tok_s", "prefill_tok_s"), ("decode tok/s", "prefill tok/s")):
        values = [getattr(r, key).median for r in result.rows]
        ax.bar(range(len(values)), values, color=["C0" if r.engine == "hearthlm" else "C1" for r in result.rows])
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("tokens/s (median)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
