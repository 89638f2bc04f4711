"""``vision-client``'s own options after a subcommand: a message that says where they go.

Click reads ``--url``, ``--model``, ``--retries`` ... only before the subcommand, and after it
says no more than "No such option". The folder clients' shared options and the scripts take
them anywhere, so ``vision-client folder dataset --model blip`` is an easy line to write; the
usage error then names the fix (``vision-client --model ... folder ...``) instead.
"""

from __future__ import annotations

import click


class SubcommandOfClient(click.Command):
    """A subcommand whose usage error for one of its group's options says to move it before it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            group = ctx.parent
            option = None if group is None else group_option(group.command, exc.option_name)
            if group is None or option is None:
                raise
            program = group.command_path
            written = exc.option_name if option.is_flag else f"{exc.option_name} ..."
            raise click.UsageError(
                f"{exc.option_name} is an option of {program} itself, not of {ctx.info_name}: give it "
                f"before the command ({program} {written} {ctx.info_name} ...)",
                ctx,
            ) from None


class ClientGroup(click.Group):
    """The ``vision-client`` group: its subcommands are :class:`SubcommandOfClient`."""

    command_class = SubcommandOfClient


def group_option(command: click.Command, name: str) -> click.Option | None:
    """The option of ``command`` that ``name`` spells (``--model`` or ``-m``), if any."""
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None
