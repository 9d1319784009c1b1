"""The ``pstudy`` console script: one entry point for the three packages.

Subcommands live next to the code they drive (``generation.cli``, ``analysis.cli``,
``study_app.commands``) and are imported lazily, so ``pstudy --help`` stays fast and
does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

import click

# name -> "module:attribute" of a click command or group. Each package adds its own
# commands here (one line each) when they exist; none is a placeholder.
SUBCOMMANDS: dict[str, str] = {
    "analyze": "analysis.cli:analyze",
    "study": "study_app.commands:study",
    "serve": "study_app.commands:serve",
    "export": "study_app.commands:export",
    "simulate": "study_app.commands:simulate",
    "researcher": "study_app.commands:researcher",
    "generate": "generation.cli:generate",
    "demo": "study_app.demo:demo",
    "losses": "generation.calibration.cli:losses",
}


def register_subcommand(name: str, target: str) -> None:
    """Add a lazily imported subcommand ``name`` found at ``module:attribute``."""
    SUBCOMMANDS[name] = target


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in SUBCOMMANDS:
            module_name, attribute = SUBCOMMANDS[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        """Run the subcommand; a bad app setting is a user mistake: message, no traceback."""
        from study_app.config import ConfigError

        try:
            return super().invoke(ctx)
        except ConfigError as error:
            raise click.ClickException(str(error)) from error


def _package_version() -> str:
    try:
        return version("perceptual-study-platform")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_package_version(), "--version", prog_name="pstudy")
def main() -> None:
    """Perceptual Study Platform: which image-generation loss do humans prefer?

    \b
    Generate stimuli with autoencoders trained on different losses, run a
    two-alternative forced-choice study in the browser, analyse the votes.

    \b
    Examples:
      pstudy --version
      pstudy COMMAND --help
    """
