"""Run refinery's stages and tools from the command line (heavy imports stay lazy)."""

from __future__ import annotations

import importlib
import sys

import click

from refinery import __version__
from refinery.core.errors import RefineryError, os_error

# name -> (module:attribute, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "fingerprint": ("stages.fingerprint:cli", "Write each stage's code fingerprint (AST hashes of its import closure)."),
    "provision": ("stages.provision:cli", "Resolve teacher, judge, student and embedder models into models/base."),
    "ingest": ("stages.ingest:cli", "Read seed documents and QA pairs into Parquet with stable ids."),
    "split": ("stages.split:cli", "Split seed QA into train/val/test by document group, without leakage."),
    "coverage": ("stages.coverage:cli", "Audit the seed's coverage of topics, intents and passages before generating."),
    "generate": ("stages.generate:cli", "Generate synthetic QA rows from the human train split with the teacher."),
    "verifiable": ("stages.verifiable:cli",
                   "Generate math and code rows from the verifiable seed; keep those execution agrees with."),
    "contaminate": ("stages.contaminate:cli", "Build the AI-contaminated comparison set from the human train split."),
    "profile": ("refinery.core.profiles:cli", "Apply a named params profile (ci, cosmosqa) onto params.yaml."),
    "inject": ("stages.inject:cli", "Plant known errors with ground-truth labels in held-out seed rows."),
    "train-verifier": ("stages.train_verifier:cli", "Train the embedded faithfulness verifier (MiniLM head)."),
    "train-reward": ("stages.train_reward:cli", "Train the embedded reward model and export DPO pairs."),
    "gate": ("stages.gate:cli", "Run every quality gate on generated rows and planted errors."),
    "audit-judge": ("stages.audit_judge:cli",
                    "Score a sample of accepted and rejected rows with the audit judge; agreement with the gates."),
    "recover": ("stages.recover:cli", "Diagnose rejected rows, recover them with targeted actions, re-gate; naive baseline."),
    "dpo": ("stages.dpo:cli",
            "Write realistic DPO rejected answers per category with the teacher; keep the checked ones."),
    "assemble": ("stages.assemble:cli", "Assemble one dataset per arm (assemble.arms) with SFT and DPO exports."),
    "raft": ("stages.raft:cli", "Export an arm's rows with gold passages and distractors (RAFT-style)."),
    "validate": ("stages.validate:cli", "Validate the assembled datasets; exit non-zero with one line per failed check."),
    "train": ("stages.train:cli", "Fine-tune the student with LoRA on one dataset; keep the best val-loss adapter."),
    "evaluate": ("stages.evaluate:cli", "Score one model (adapter or untuned base) on the human test split."),
    "collapse": ("stages.collapse:cli",
                 "Replace vs accumulate: generations of students trained on their predecessor's answers."),
    "report": ("stages.report:cli", "Write reports/report.md and its plots from the metrics files."),
    "review": ("stages.review:cli", "Write the static review page and the human-review sample export."),
    "diff": ("refinery.inspect.diff:cli", "Row-level diff of every dataset between two revisions (table, Markdown, JSON)."),
    "trace": ("refinery.inspect.trace:cli", "Show a row's lineage back to its seed rows and document span, and where it ended."),
    "doctor": ("refinery.inspect.doctor:cli", "Check installed packages and that every role's model resolves."),
    "docs": ("refinery.inspect.docs:cli",
             "A static docs site: DAG, stages, contracts, expectations, metrics, samples."),
    "plots": ("refinery.inspect.plots:cli",
              "Every DVC plot as one HTML page that renders offline (Vega inlined)."),
    "check": ("refinery.inspect.check:cli", "Check every params section, model role and the seed input before dvc repro."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, so ``--help`` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from their one-line help without importing them."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refinery")
def cli() -> None:
    """refinery: curate synthetic post-training data from human seed data, with provenance.

    Every DVC stage is a subcommand; `dvc repro` runs them in order from dvc.yaml.
    """


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user-fixable errors into one line and exit code 2.

    Before any command runs, leftovers of killed refinery runs in the current folder are removed (a
    commit cut short by a kill is rolled back to the previous outputs first).
    """
    from refinery.core.scratch import clean_stale

    try:
        for line in clean_stale("."):
            click.echo(f"refinery: {line} (left by a killed run)", err=True)
        cli.main(args=argv, prog_name="refinery", standalone_mode=False)
    except RefineryError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except OSError as e:  # a file system error outside atomic_outputs (reading an input, a cache)
        err = os_error(e)
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
