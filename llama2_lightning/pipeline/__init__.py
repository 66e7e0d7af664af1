"""The whole recipe in one command: ``llama2-lightning pipeline --config configs/pipeline/tiny.yaml``.

A pipeline file lists stages; each stage is an ordinary ``llama2-lightning fit`` of a stage config
(``configs/<stage>/*.yaml``) with a few keys changed and the previous stages' checkpoints wired in::

    run_dir: runs/pipeline-tiny            # every stage writes to <run_dir>/<stage name>/
    set: {trainer.enable_progress_bar: false}   # applied to every stage
    stages:
      - name: sft
        config: configs/sft/tiny.yaml
        inputs: {model.init_args.init_from: pretrain}   # key <- that stage's checkpoint
        set: {trainer.max_epochs: 2}                    # key <- value
        metric: val/loss                                # shown on the progress line
    report: {baseline: sft, final: ppo-v5}              # llama2_lightning.report

Keys are dotted paths into the stage YAML. On a list, a number picks an element and a class name
picks the element whose ``class_path`` ends with it (``trainer.callbacks.RejectionSamplingCallback.
init_args.pool_from``). A missing intermediate key is an error naming the pipeline file, the stage
and the key; the last key may be new (LightningCLI then checks it like any command-line option).

For each stage the pipeline writes ``<run_dir>/<name>/stage-config.yaml`` (the merged config, so
``llama2-lightning fit --config`` on it reruns the stage by hand), runs it in a fresh process with
its output in ``stage.log``, and when training reached its end (exit 0 and ``fit-status.json`` says
``completed``) records ``stage.json`` (time, metric, checkpoint).

Rerunning skips every stage with a ``stage.json``; a stage that was interrupted after writing a
checkpoint resumes from it (``--ckpt_path``; from the newest readable ``step*.ckpt`` when
``last.ckpt`` is damaged), so a crash costs at most the work since the last checkpoint. SIGTERM or
Ctrl-C stops the running stage cleanly (it saves a checkpoint), waits for it, and exits 143 / 130.
``--dry-run`` parses every stage's merged config as ``fit`` would, so a mistyped key fails at once.
``--from-stage NAME`` moves that stage's and every later stage's directory to
``<run_dir>/.superseded/<time>/`` (nothing is deleted) and runs them again.

Modules: :mod:`.spec` (the pipeline file), :mod:`.run` (the stages), :mod:`.metrics` (what they logged),
:mod:`.report` (report.md); the command is :mod:`llama2_lightning.commands.pipeline`.
"""
