"""Pipeline parallelism over 2 and 4 gloo ranks on this machine gives what one process gives: logits within 1e-5
(fp32), a batch, cached decode after a prefill, and the engine's greedy and seeded tokens; each rank caches K/V
for its own layers only; and a split that cannot be made is refused with the rank counts that work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from split_checks import compare, record

from hearthlm import LLM, SamplingParams
from hearthlm.cli import main
from hearthlm.distributed.mesh import Mesh
from hearthlm.distributed.pipeline import PipelineError, allowed_cuts, split_model, stage_bounds
from hearthlm.distributed.run import launch

TWO = ["llama", "qwen3", "gemma3", "gemma4_dense", "qwen3_moe", "gemma4_all"]  # shared tiny checkpoints: 3 or 6 layers
FOUR = ["gemma3", "llama_deep", "gemma4_deep"]  # llama_deep, gemma4_deep: tests/checkpoints.py
# Under an expert budget each stage's pool serves its own layers' experts, the budget's share of those.
BUDGETED = {"qwen3_moe-budget": "50%", "gemma4_all-budget": "50%"}


@pytest.fixture(scope="module")
def folders(checkpoint) -> dict[str, Path]:
    return {n: checkpoint(n)[1] for n in TWO + FOUR}


@pytest.fixture(scope="module")
def ranks(folders, tmp_path_factory) -> dict[int, Path]:
    """Every case on 2 ranks, then on 4 (one start-up each): their results, saved by the ranks."""
    worker, out = Path(__file__).with_name("pp_worker.py"), {}
    for world, names in ((2, TWO), (4, FOUR)):
        out[world] = tmp_path_factory.mktemp(f"pp{world}")
        specs = [f"{n}={folders[n]}" for n in names]
        if world == 2:
            specs += [f"{n}={folders[n.split('-')[0]]}:{budget}" for n, budget in BUDGETED.items()]
        assert launch(world, [sys.executable, str(worker), str(out[world]), *specs]) == 0
    return out


def _check_stages(out: Path, name: str, world: int, llm: LLM) -> None:
    """The stages tile the layers in rank order, and each rank's caches hold K/V for its own layers only."""
    stages = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(world)]
    edges = [s["stage"] for s in stages]
    assert edges[0][0] == 0 and edges[-1][1] == llm.config.num_layers
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(edges, edges[1:]))
    for (a, b), s in zip(edges, stages):
        own = [i for i in range(a, b) if llm.config.layers[i].kv_source is None]
        assert s["cached"] == own and s["paged"] == own


@pytest.mark.parametrize("name", BUDGETED)
def test_stages_under_a_budget_match_one_process(name, ranks, folders):
    """Each stage loads with the budget over its own layers' experts: its pool holds experts of those layers
    alone, and as many slots as the budget's share of them; the tokens and logits are one process's."""
    llm = LLM(folders[name.split("-")[0]], dtype="float32")
    compare(torch.load(ranks[2] / f"{name}.pt"), record(llm), llm)
    stages = [json.loads((ranks[2] / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    for stage in stages:
        a, b = stage["stage"]
        moe = [i for i in range(a, b) if llm.config.layers[i].moe]
        assert moe and stage["pool"]["layers"] == moe
        assert stage["pool"]["slots"] == len(moe) * llm.config.num_experts // 2


@pytest.mark.parametrize(("world", "name"), [(2, n) for n in TWO] + [(4, n) for n in FOUR])
def test_ranks_match_one_process(world, name, ranks, folders):
    llm = LLM(folders[name], dtype="float32")
    compare(torch.load(ranks[world] / f"{name}.pt"), record(llm), llm)
    _check_stages(ranks[world], name, world, llm)


def test_cuts_keep_kv_shared_layers_with_their_source(loaded, checkpoint):
    gemma4 = loaded("gemma4_dense")[1].model  # layers 3-5 read the caches of layers 1 and 2
    assert allowed_cuts(gemma4) == [1]
    assert stage_bounds(gemma4, 2) == [(0, 1), (1, 6)]
    deep4 = LLM(checkpoint("gemma4_deep")[1], dtype="float32").model  # layers 6-8 read layers 4 and 5
    assert allowed_cuts(deep4) == [1, 2, 3, 4]
    assert stage_bounds(deep4, 4) == [(0, 2), (2, 3), (3, 4), (4, 9)]  # the last stage holds 5 of 9
    llama = LLM(checkpoint("llama_deep")[1], dtype="float32").model  # equal layers: equal stages
    assert stage_bounds(llama, 2) == [(0, 3), (3, 6)] and stage_bounds(llama, 3) == [(0, 2), (2, 4), (4, 6)]


def test_refused_splits_name_counts_that_work(loaded):
    with pytest.raises(PipelineError, match=r"into 4 pipeline stages: it has 3 layers; rank counts that work: 1, 2, 3"):
        split_model(loaded("llama")[1].model, Mesh(0, 4))
    with pytest.raises(PipelineError, match=r"KV-shared layer \(3-5\).*rank counts that work: 1, 2$"):
        split_model(loaded("gemma4_dense")[1].model, Mesh(0, 3))


def test_a_rank_frees_the_other_stages(checkpoint):
    llm = LLM(checkpoint("llama_deep")[1], dtype="float32")
    whole = {n for n, _ in llm.model.named_parameters()}
    split_model(llm.model, Mesh(1, 2))  # rank 1 of 2: layers 3-5; no collective runs until a forward
    kept = {n for n, _ in llm.model.named_parameters()}
    assert kept == {n for n in whole if not n.startswith(("layers.0.", "layers.1.", "layers.2."))}
    assert [s.num_kv_heads for s in llm.model.kv_layers] == [0, 0, 0, 2, 2, 2]
    assert [s.num_kv_heads for s in llm.config.layers] == [2] * 6  # the engine sizes its pools from the whole model


def test_hearth_run_pp_prints_what_one_process_prints():
    prompt, options = "The capital of France is", ["--raw", "--temperature", "0", "--max-tokens", "12"]
    expected = LLM(dtype="float32").generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0].text
    cmd = [sys.executable, "-m", "hearthlm.cli", "run", prompt, *options, "--dtype", "float32", "--pp", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    cmd[-1] = "4"  # the ranks split by layers: the demo's 6 layers, the last 2 KV-shared, make at most 3 stages
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot be split into 4 pipeline stages" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "hearth-demo", "hi", "--tp", "2", "--pp", "2"],
            "give one of --tp N, --ep N and --pp N, not --tp and --pp",
        ),
        (
            ["serve", "hearth-demo", "--pp", "2", "--draft", "auto"],
            "--draft is not available with --tp, --ep or --pp yet",
        ),
        (["serve", "--pp", "2"], "hearth serve --pp N needs a MODEL"),
    ],
)
def test_options_refused_before_any_rank_starts(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "hi", "--raw", "--pp", "4"], "cannot be split into 4 pipeline stages"),
        (["run", "hi", "--raw", "--tp", "3"], "4 attention heads do not divide among 3 ranks"),
        (["serve", "hearth-demo", "--pp", "4"], "cannot be split into 4 pipeline stages"),
        (["serve", "hearth-demo", "--ep", "3"], "rank counts that work: 1, 2, 4"),
    ],
)
def test_a_split_the_model_cannot_take_is_refused_before_any_rank_starts(argv, message, monkeypatch, capsys):
    from hearthlm.distributed import run

    def start(*args, **kwargs):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(run, "relaunch", start)
    monkeypatch.setattr(run, "launch", start)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
