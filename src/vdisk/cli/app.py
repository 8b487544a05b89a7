"""The click command tree of ``vdisk``: a group whose subcommands load when they run."""

from __future__ import annotations

import importlib

import click

from .. import __version__
from . import COMMAND_TABLE, DESCRIPTION


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when run (or asked for their help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_TABLE)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMAND_TABLE.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(f"vdisk.cli.{entry[0]}")
        command: click.Command = getattr(module, entry[1])
        from .options import add_secret_options  # --object, --image-opts on every command

        add_secret_options(cmd_name, command)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in COMMAND_TABLE and not args[0].startswith("-"):
            # qemu-img's words for an unknown command.
            raise click.UsageError(
                f"Command not found: {args[0]}\nTry 'vdisk --help' for more information"
            )
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMAND_TABLE[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    help=DESCRIPTION,
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
)
@click.version_option(
    __version__,
    "-V",
    "--version",
    prog_name="vdisk",
    message="%(prog)s version %(version)s",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        # A bare qemu-img says what is missing and exits 1.
        raise click.UsageError("Not enough arguments\nTry 'vdisk --help' for more information")


def run_click(args: list[str]) -> int:
    """Run ``vdisk ARGS`` through click; click's own errors exit 1, as qemu-img's do."""
    try:
        result = cli.main(args=args, prog_name="vdisk", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vdisk: aborted", err=True)
        return 1
    except click.ClickException as exc:
        # qemu-img exits 1 on a bad flag; click's default would be 2.
        click.echo(f"vdisk: {exc.format_message()}", err=True)
        return 1
    return result if isinstance(result, int) else 0
