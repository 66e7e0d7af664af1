"""The README's downstream-subclass example, run exactly as printed there: its Python goes into a
package of its own outside this project, its YAML is layered over configs/sft/tiny.yaml, and a short
fit must leave the frozen weights untouched while the others train."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from paths import ROOT

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.cli import lightning_cli


def readme_block(language: str, first_line: str) -> str:
    """The README code block of ``language`` whose first line is ``first_line``."""
    for body in re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        if body.splitlines()[0].strip() == first_line:
            return body
    raise AssertionError(f"README.md has no ```{language} block starting with {first_line!r}")


def test_readme_subclass_example_trains_only_the_unfrozen_blocks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_block("python", "# my_project/frozen_sft.py")
    config = readme_block("yaml", "# my_sft.yaml: layered over configs/sft/tiny.yaml")
    command = readme_block("bash", "llama2-lightning fit --config configs/sft/tiny.yaml --config my_sft.yaml")
    package = tmp_path / "src" / "my_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "frozen_sft.py").write_text(code)
    (tmp_path / "my_sft.yaml").write_text(config)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delitem(sys.modules, "my_project", raising=False)
    monkeypatch.chdir(ROOT)

    # a 6-block base model, so that freeze_layers: 4 leaves blocks 4 and 5 training
    torch.manual_seed(0)
    base = Transformer(LlamaConfig.from_name("tiny", n_layers=6))
    init = tmp_path / "base.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.state_dict().items()},
                "llama_config": base.config.to_dict()}, init)

    argv = command.split()[1:]  # the README's command, minus the program name ...
    argv[argv.index("my_sft.yaml")] = str(tmp_path / "my_sft.yaml")
    cli = lightning_cli([*argv, f"--model.init_args.init_from={init}",  # ... plus a short, quiet run
                         "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                         f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.callbacks.max_new_tokens=4"])
    module = cli.model
    assert type(module).__name__ == "FrozenBottomSFT" and module.freeze_layers == 4
    assert module.optimizer_args.lr == 3.0e-4  # kept from configs/sft/tiny.yaml under the new class
    assert cli.trainer.global_step == 3
    after = module.model.state_dict()
    before = base.state_dict()
    frozen = [k for k in before if k.startswith("tok_embeddings.") or re.match(r"layers\.[0-3]\.", k)]
    trained = [k for k in before if re.match(r"layers\.[45]\.", k) or k.startswith(("norm.", "output."))]
    assert frozen and trained
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in trained)
