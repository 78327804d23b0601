"""Schemathesis's CLI (`python tests/schemathesis_cli.py run ...`), shielded from a CPython 3.11 bug in its tooling.

Hypothesis describes our recursive JSON-value strategies by parsing the source of their lambdas with the ast
module, even when nothing fails. Deep in that recursion CPython 3.11 can raise "SystemError: AST constructor
recursion depth mismatch". It did in about one CI run in three, in the tool's data generation, never in a request
to the server. A deeper stack made it rarer, not gone. The description is only text in Hypothesis's messages, so
a lambda whose source cannot be parsed is named without it; every generated case still runs.
"""

import runpy
import sys
import threading

from hypothesis.internal import lambda_sources

_describe = lambda_sources.lambda_description


def _lambda_description(f) -> str:
    try:
        return _describe(f)
    except SystemError:  # the CPython 3.11 ast bug above
        return "lambda: <source not parsed>"


lambda_sources.lambda_description = _lambda_description
sys.setrecursionlimit(8000)
threading.stack_size(256 << 20)
sys.argv[0] = "schemathesis"
runpy.run_module("schemathesis.cli", run_name="__main__")
