"""Token embeddings: a gather of table rows, from a float table or a quantized one (rows dequantized as read),
or a GGUF block-type table left in the file (ggml.GGMLRows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.ggml import GGMLRows
from ..quant.linear import quant_rows
from ..quant.tensor import QuantTensor


def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as the nearest number of `dtype`: Gemma scales its embeddings by a constant stored in the weights'
    dtype (sqrt(1536) -> 39.25 in bf16)."""
    return torch.tensor(value, dtype=dtype).item()


def lookup(table: torch.Tensor | QuantTensor | GGMLRows, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of `table` -> [*ids.shape, D], in the table's dtype (float32 if quantized)."""
    if isinstance(table, QuantTensor):
        return quant_rows(table, ids.reshape(-1)).view(*ids.shape, table.shape[-1])
    if isinstance(table, GGMLRows):
        return table.rows(ids.reshape(-1)).view(*ids.shape, table.shape[-1])
    return F.embedding(ids, table)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.weight, ids)
