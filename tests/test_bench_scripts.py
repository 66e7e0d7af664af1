"""Every per-figure benchmark script (benchmarks/bench_*.py, gpu_check.sh): argument handling and the
rows of its table, on --quick sizes in seconds. No timing assertions: only that each figure is
computed, named and consistent."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch
from scripts import load_script
from test_tokenizer_hf import write_bpe_tokenizer

from llama2_lightning.checkpoint import save_hf
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    return load_script(BENCH / f"{name}.py")


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _check_ratio_rows(table: str, names: list[str]) -> None:
    rows = _rows(table)
    assert [any(n in r[0] for r in rows) for n in names] == [True] * len(names), table
    for _, ours, theirs, ratio in rows:
        assert float(ours) > 0 and float(theirs) > 0
        assert float(ratio) == pytest.approx(float(ours) / float(theirs), rel=0.05, abs=0.01)


@pytest.mark.parametrize("name", ["bench_train", "bench_generate", "bench_best_of_k", "bench_mfu", "bench_memory",
                                  "bench_ppo", "bench_real_model", "bench_tensor_parallel", "bench_finetune",
                                  "bench_safety_preprompt"])
def test_help_and_bad_arguments(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load(name)
    with pytest.raises(SystemExit) as ok:
        bench.main(["--help"])
    assert ok.value.code == 0 and "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        bench.main(["--no-such-flag"])
    assert bad.value.code == 2


def test_bench_train_quick(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    result = _load("bench_train").main(["--quick", "--profile"])
    _check_ratio_rows(result["table"], ["training step fp32"])
    loss_ours, loss_theirs = result["loss"]
    assert loss_ours == pytest.approx(loss_theirs, abs=1e-4)  # same weights, same batch
    out = capsys.readouterr().out
    assert "| measurement | ours tok/s | transformers tok/s | ours/theirs |" in out
    bound = result["gemm_bound"]  # --profile: GEMM time within all operator time, and the ceiling from it
    for who in ("ours", "theirs"):
        assert 0 < bound[f"{who}_gemm_s"] < bound[f"{who}_total_s"]
    assert bound["ceiling"] == pytest.approx(bound["theirs_step_s"] / bound["ours_gemm_s"])
    assert f"= {bound['ceiling']:.2f}x transformers" in out


def test_bench_generate_quick() -> None:
    pytest.importorskip("transformers")
    result = _load("bench_generate").main(["--quick", "--no-compile"])
    _check_ratio_rows(result["table"], ["greedy generation (eager)"])
    assert len(_rows(result["table"])) == 1
    assert result["tokens_identical"] == {"eager": True}


def test_bench_best_of_k_quick() -> None:
    result = _load("bench_best_of_k").main(["--quick", "--shapes", "8:4,12:3"])
    rows = _rows(result["table"])
    assert [r[0] for r in rows] == ["best-of-3, 2 prompts x 8 tokens, 4 new tokens",
                                    "best-of-3, 2 prompts x 12 tokens, 3 new tokens"]
    _check_ratio_rows(result["table"], ["best-of-3"])
    assert result["samples_identical"] == [True, True]


def test_bench_mfu_quick() -> None:
    pytest.importorskip("transformers")
    bench = _load("bench_mfu")
    result = bench.main(["--quick", "--dtypes", "fp32,bf16"])
    rows = _rows(result["table"])
    assert [r[0].split(",")[0] for r in rows] == ["fp32", "bf16"]
    for name, row in zip(["fp32", "bf16"], rows):
        r = result["results"][name]
        assert r["peak_flops"] > 0
        assert r["ours_mfu"] == pytest.approx(r["measurement"].ours_tok_s * result["flops_per_token"] / r["peak_flops"])
        assert row[3] == f"{r['ours_mfu']:.1%}"
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--quick", "--dtypes", "fp8"])


def test_bench_memory_quick() -> None:
    pytest.importorskip("bitsandbytes")
    result = _load("bench_memory").main(["--quick"])
    m = result["results"]["tiny"]
    assert m["grads"] == m["weights"] > 0
    assert 2 * m["weights"] <= m["adamw"] < 2 * m["weights"] + 4096  # two fp32 moments (+ step counters)
    assert m["adamw8bit"] < m["adamw"]
    assert m["frozen_bf16"] < 0.6 * m["frozen_fp32"]  # half, plus the RoPE table that stays float32
    assert 0 < m["frozen_int8"] < m["frozen_fp32"]
    assert m["rm_activations"] > m["activations"] > 0  # twice the sequences save more
    stages = [r[1] for r in _rows(result["stage_table"])]
    assert len(stages) == 8 and sum("PPO step" in s for s in stages) == 4
    for row in _rows(result["stage_table"]):
        parts = [float(c.replace(",", "")) for c in row[2:7] if c != "-"]
        assert float(row[7].replace(",", "")) == pytest.approx(sum(parts), abs=0.3)


def test_bench_ppo_quick() -> None:
    result = _load("bench_ppo").main(["--quick"])
    rows = _rows(result["table"])
    assert [r[0] for r in rows] == ["generation", "scoring", "optimisation", "total"]
    seconds = result["seconds"]
    assert all(seconds[k] > 0 for k in ("generation", "scoring", "optimisation"))
    assert float(rows[-1][1]) == pytest.approx(sum(seconds.values()), abs=2e-3)


def test_gpu_check_script_arguments(tmp_path: Path) -> None:
    script = BENCH / "gpu_check.sh"
    run = lambda *a: subprocess.run(["bash", str(script), *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    helped = run("--help")
    assert helped.returncode == 0 and "--dry-run" in helped.stdout and "--device" in helped.stdout
    dry = run("--dry-run")
    assert dry.returncode == 0 and "1.1" in dry.stdout and "B parameters" in dry.stdout  # the ~1B config
    assert run("--device", "tpu").returncode == 2
    cpu = run("--device", "cpu", "--no-compile")
    assert cpu.returncode == 0, cpu.stderr
    rows = _rows(cpu.stdout[cpu.stdout.index("| measurement"):])
    assert [r[0] for r in rows] == ["bf16 training step, transformers, eager", "bf16 training step, ours, eager",
                                    "decode, batch 2, eager"]
    theirs, ours = (float(r[1].split()[0].replace(",", "")) for r in rows[:2])
    ratio = float(rows[1][2].split("; ")[-1].removesuffix("x transformers"))
    assert "MFU" in rows[0][2] and ratio == pytest.approx(ours / theirs, abs=0.006)
    assert "of roofline" in rows[2][2]
    assert "logits parity" in cpu.stdout and "FAILED" not in cpu.stdout


def test_bench_real_model_quick(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    write_bpe_tokenizer(tmp_path)  # tokenizer.json with a ChatML template beside the weights
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_name("tiny", vocab_size=400, tie_word_embeddings=True))
    save_hf(model.config, model.state_dict(), tmp_path)
    result = _load("bench_real_model").main([str(tmp_path), "--quick"])
    _check_ratio_rows(result["table"], ["greedy generation, batch 1"])
    assert result["tokens_identical"] == {1: True}


def test_bench_tensor_parallel_quick() -> None:
    result = _load("bench_tensor_parallel").main(["--quick"])
    # the TP plan on a 1-rank mesh is the same computation as the plain model: identical numbers
    assert result["logits_max_diff"] < 1e-6
    assert result["loss"][0] == pytest.approx(result["loss"][1], abs=1e-6)
    assert result["same_tokens"]
    _check_ratio_rows(result["table"], ["training step float32", "decode, batch 2"])


@pytest.mark.slow
def test_bench_finetune_quick_fits_each_option_and_reads_its_metrics(tmp_path: Path) -> None:
    """Two of the options on a tiny random GGUF: each fit runs with its `finetune:` key (the top-block run
    leaves block 0 as imported, full fine-tuning moves it), and each row carries the metrics its run logged."""
    import json

    from tiny_gguf import write_tiny_gguf

    from llama2_lightning.checkpoint import load_checkpoint

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer in at most 15 words."}, {"role": "user", "content": f"Name {i} birds."},
        {"role": "assistant", "content": "Robins and crows."}]}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    result = _load("bench_finetune").main([
        "--quick", "--options", "full", "blocks", "--blocks", "1", "--dialogs", str(dialogs), "--out", str(out),
        "--set", f"model.init_args.init_from={gguf}", f"data.init_args.tokenizer_path={gguf}",
        "trainer.limit_val_batches=1", "trainer.enable_model_summary=false",
        "data.init_args.max_seq_len=768",
        "--eval-set", f"tokenizer={gguf}", "gatt-turns=3", "gatt-max-new-tokens=6", "batch-size=4"])
    rows = {r["option"]: r for r in result["rows"]}
    assert list(rows) == ["full", "blocks"]
    for r in rows.values():
        assert r["fit_s"] > 0 and r["val/loss"] > 0 and 0 <= r["val/acc"] <= 1 and 0 <= r["gatt_late"] <= 1
    table = _rows(result["table"])
    assert [r[0] for r in table] == ["full", "blocks"]
    assert float(table[1][2]) == pytest.approx(rows["blocks"]["fit_s"] / rows["full"]["fit_s"], abs=0.01)
    assert float(table[1][3]) == pytest.approx(rows["blocks"]["val/loss"], abs=1e-3)
    assert rows["full"]["val/loss"] != rows["blocks"]["val/loss"]  # each row read its own run's metrics
    imported = load_checkpoint(gguf)[1]["layers.0.attention.wq.weight"]
    trained = {o: torch.load(out / o / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
               for o in rows}
    block0 = [k for k in trained["full"] if k.endswith("layers.0.attention.wq.weight")]
    assert len(block0) == 1
    assert not torch.equal(trained["full"][block0[0]], imported) and torch.equal(trained["blocks"][block0[0]], imported)


def test_bench_safety_preprompt_counts_refusals_per_condition(tmp_path: Path) -> None:
    """The preprompt goes in the system turn of the second condition only, and each rate counts that
    condition's refusals: a scripted model that refuses exactly when it sees a system turn gives 0 and 1."""
    import gzip
    import json

    bench = _load("bench_safety_preprompt")

    def scripted(dialogs):
        return ["I'm sorry, but I can't help with that." if d[0]["role"] == "system" else "Sure: step one." for d in dialogs]

    assert bench.refusals(scripted, ["a", "b", "c"], None)[0] == 0.0
    rate, answers = bench.refusals(scripted, ["a", "b", "c"], "Be safe.")
    assert rate == 1.0 and len(answers) == 3
    assert bench.dialogs(["q"], "Be safe.") == [[{"role": "system", "content": "Be safe."},
                                                  {"role": "user", "content": "q"}]]
    table = bench.format_rows([{"set": "red-team", "n": 4, "plain": 0.25, "preprompt": 0.75}])
    assert _rows(table) == [["red-team", "4", "0.250", "0.750", "+50.0"]]

    pairs = tmp_path / "pairs.jsonl.gz"
    with gzip.open(pairs, "wt") as f:
        for i in range(3):
            f.write(json.dumps({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: yes", "rejected": "x"}) + "\n")
    assert bench.hh_first_turns(pairs, 2, skip=1) == ["question 1?", "question 2?"]
    with pytest.raises(SystemExit, match="pairs.jsonl.gz: 2 records after --skip 1, --prompts asks for 3"):
        bench.hh_first_turns(pairs, 3, skip=1)


def test_bench_safety_preprompt_quick_on_a_tiny_gguf(tmp_path: Path) -> None:
    import gzip
    import json

    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    pairs = tmp_path / "pairs.jsonl.gz"
    with gzip.open(pairs, "wt") as f:
        for i in range(4):
            f.write(json.dumps({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: yes", "rejected": "no"}) + "\n")
    result = _load("bench_safety_preprompt").main(["--quick", "--checkpoint", str(gguf), "--unsafe", str(pairs),
                                                   "--safe", str(pairs), "--skip", "0"])
    assert [r["n"] for r in result["rows"]] == [2, 2]
    for row in _rows(result["table"]):
        assert 0 <= float(row[2]) <= 1 and 0 <= float(row[3]) <= 1
        assert float(row[4]) == pytest.approx(100 * (float(row[3]) - float(row[2])), abs=0.1)


def test_bench_finetune_reads_the_pipelines_evaluate_options(tmp_path: Path) -> None:
    """The evaluate options are the SmolLM2 pipeline's eval-base ones (less checkpoint and dialog count),
    passed as the pipeline passes them; a pipeline without that evaluate stage exits before any fit."""
    import yaml

    bench = _load("bench_finetune")
    shipped = yaml.safe_load(bench.PIPELINE.read_text())
    [stage] = [s for s in shipped["stages"] if s["name"] == "eval-base"]
    options = bench.eval_args(bench.PIPELINE)
    assert options == {k: v for k, v in stage["args"].items() if k not in ("checkpoint", "gatt-dialogs")}
    assert options["gatt-turns"] == 5 and "checkpoint" not in options
    assert bench.option_argv({"a": True, "b": False, "c": [1, 2], "d": "x"}) == ["--a", "--c", "1", "--c", "2",
                                                                                "--d", "x"]
    with pytest.raises(SystemExit, match="--pipeline: .*absent.yaml"):
        bench.main(["--pipeline", str(tmp_path / "absent.yaml")])
    other = tmp_path / "p.yaml"
    other.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "stages": [{"name": "eval-base", "command": "gatt",
                                                                          "args": {"input": "x"}}]}))
    with pytest.raises(SystemExit, match="stage 'eval-base' runs llama2-lightning gatt, not"):
        bench.eval_args(other)
