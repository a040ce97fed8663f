"""The ``retrieval`` command: one subcommand per DVC stage, each defined in ``stages/<stage>.py``, and the tools.

``dvc.yaml`` runs ``retrieval <stage>``; the code behind it is ``stages/<stage>.py`` (thin glue: read params,
call the ``retrieval`` library, write outputs). ``TOOLS`` are subcommands that are not stages (they read the
outputs of a run and write nothing DVC tracks), defined the same way in ``stages/<tool>.py``.
"""

from __future__ import annotations

import importlib

import click

from retrieval.allocator import keep_freed_memory

from .common import setup_logging

STAGES = ("download", "queries", "split", "mine", "synthesize", "train_reranker", "teacher_scores", "export", "train",
          "index", "evaluate", "generalize", "rerank")
TOOLS = ("report", "explore")
COMMANDS = STAGES + TOOLS


class StageGroup(click.Group):
    """Imports a stage's module only when that stage runs, so ``retrieval download`` does not load torch."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"stages.{name}").command


@click.group(cls=StageGroup)
def main() -> None:
    setup_logging()
    keep_freed_memory()  # training and encoding steps reuse their memory instead of faulting it in each time


main.help = (f"Fine-tune and evaluate retrieval models. Stages of dvc.yaml (`dvc repro` runs them): "
             f"{', '.join(STAGES)}. Tools (they read a run's outputs and write nothing DVC tracks): {', '.join(TOOLS)}.")


if __name__ == "__main__":
    main()
