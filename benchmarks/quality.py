"""Quality of each weight format against the unquantized model: KL divergence and top-1 agreement of the
next-token distributions, and perplexity, on held-out text (benchmarks/data/heldout.txt: KJV, fortunes and
Python docs passages the demo model never trained on).

    python benchmarks/quality.py [MODEL] [--tokens 1024] [--formats int8,int4-g32,...] [--gguf Q8_0,Q4_0,...]

MODEL defaults to the trained demo model. Our formats are quantized at load (LLM(quant=...)). GGUF types
are applied to the same matrices as our formats (linear layers and experts; embeddings and the LM head stay
int8 per row, as in ours, so the rows compare the matrix formats alone): each matrix is encoded into the
type's blocks (the `gguf` package's quantizers; tests/gguf_files.py's simple encoders for the K-types, which
are cruder than llama.cpp's, so their rows are pessimistic) and repacked as a GGUF file's tensor is.
Logits come from one prefill pass (dequantized tiles); --step 1 feeds the tokens one at a time through
the KV cache instead, as generation does (the int8-activation GEMV kernel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hearthlm import LLM
from hearthlm.bench.results import compare
from hearthlm.quant import ggml
from hearthlm.quant.quantize import QuantSpec
from hearthlm.weights.loader import _quant_plan

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128"]
GGUF = ["Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q4_0", "Q4_1", "Q4_K"]


def ggml_model(model, qtype: str) -> LLM:
    """`model` loaded in float32 with every planned matrix replaced by its `qtype` blocks, repacked."""
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_files import encode

    llm = LLM(model, dtype="float32", quant="int8")  # embeddings / head int8 per row, matrices replaced below
    ref = LLM(model, dtype="float32")
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    plan = _quant_plan(ref.model, QuantSpec(4, 32))
    for name, spec in plan.items():
        if spec.bits == 8 and spec.group is None:  # embeddings and LM head: keep int8 per row
            continue
        owner, _, attr = name.rpartition(".")
        weight = getattr(ref.model.get_submodule(owner), attr).detach()
        data, ttype = encode(weight.float().numpy(), kind)
        if ttype != kind:
            continue  # rows too short for the type's blocks: left as int8
        raw = torch.from_numpy(data.reshape(-1).view("uint8").copy())
        packed = ggml.repack(raw, int(ttype), tuple(weight.shape))
        parent = llm.model.get_submodule(owner)
        delattr(parent, attr)
        setattr(parent, attr, packed)
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a model (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--gguf", default=",".join(GGUF))
    ap.add_argument("--step", type=int, default=None, help="tokens per forward through the KV cache (1: decode)")
    args = ap.parse_args()
    ref = LLM(args.model, dtype="float32")
    text = (ROOT / "benchmarks" / "data" / "heldout.txt").read_text()
    ids = ref.tokenizer.encode(text)[: args.tokens]
    rows = [(f, lambda f=f: LLM(args.model, dtype="float32", quant=f)) for f in args.formats.split(",") if f]
    rows += [(f"GGUF {t}", lambda t=t: ggml_model(args.model, t)) for t in args.gguf.split(",") if t]
    table = Table(
        title=f"{ref.path.name}: {len(ids)} held-out tokens against float32"
        + (f", step {args.step}" if args.step else "")
    )
    for col in ("format", "KL mean", "KL max", "top-1 agreement", "perplexity", "float perplexity"):
        table.add_column(col, justify="left" if col == "format" else "right")
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("measuring", total=len(rows))
        for label, make in rows:
            q = compare(ref, make(), ids, step=args.step)
            table.add_row(label, f"{q.kl_mean:.5f}", f"{q.kl_max:.4f}", f"{100 * q.top1_agreement:.1f}%",
                          f"{q.ppl_candidate:.2f}", f"{q.ppl_reference:.2f}")  # fmt: skip
            progress.advance(task)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
