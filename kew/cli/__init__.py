"""The ``kew`` command: run workers, send tasks, look at queues, dead letters and tasks.

    kew worker myservice.tasks:app --concurrency 8 [--processes 4]
    kew send --app myservice.tasks:app thumbnails '{"image_id": 1}'
    kew queues --app myservice.tasks:app
    kew dead list thumbnails --app myservice.tasks:app
    kew task 3f2a... --follow
    kew tasks --status failed --since 2024-05-01

``MODULE:APP`` names a :class:`kew.task.App` like uvicorn does: a module
(``pkg.mod``) or a file path (``svc/tasks.py``), then ``:`` and the
attribute (``app`` when left out).  Where no app is given, ``--url`` (or
``$KEW_URL``, else the SQLite default) says which broker to look at.

Every mistake (a bad ``MODULE:APP``, URL, option or JSON body, an unknown
queue or task, an unreachable broker) is one line on stderr and exit code 2;
never a traceback of kew's (an error in the user's module shows the user's
code), never a password (connector URLs are redacted).  See docs/cli.md.

The commands live by concern in private modules: ``_queues`` (queues,
dead), ``_tasks`` (send, task, tasks), ``_worker`` (worker, recorder);
``_common`` (errors, options), ``_load`` (MODULE:APP), ``_output`` (tables,
JSON) and ``_logs`` (--log-level, --log-format) are what they share.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from kew.cli._common import DEFAULT_STORE, CliError, clear_errors, fail
from kew.cli._load import load_app
from kew.cli._logs import setup_logging
from kew.cli._output import print_table
from kew.cli._queues import dead, queues
from kew.cli._tasks import send, task, tasks
from kew.cli._worker import recorder, worker
from kew.connect import install_hint

__all__ = [
    "DEFAULT_STORE",
    "LAZY_COMMANDS",
    "CliError",
    "clear_errors",
    "fail",
    "load_app",
    "main",
    "print_table",
    "setup_logging",
]

#: Commands that live in optional extras, imported only when used:
#: name -> ("module:attribute" of a click command, the extra that installs it).
#: The web helper's ``kew serve`` is registered here.
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("kew.web.cli:serve", "web", "Serve the REST API and web pages of MODULE:APP."),
}


#: click >= 8.2 shows a group's help as a usage error when it is given no command.
_NO_ARGS_IS_HELP: type[Exception] = getattr(click.exceptions, "NoArgsIsHelpError", CliError)


class KewGroup(click.Group):
    """Commands, plus those of optional extras imported when first used;
    a usage error of any command is one line too."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        target, extra, help_text = LAZY_COMMANDS[cmd_name]
        module_name, _, attr = target.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except ImportError as e:
            return _missing_extra(cmd_name, extra, help_text, str(e))
        if not isinstance(found, click.Command):
            raise TypeError(f"{target} is not a click command")
        return found

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if isinstance(e, CliError | _NO_ARGS_IS_HELP):  # (help is not an error)
                raise
            where = e.ctx.command_path if e.ctx is not None else "kew"
            raise CliError(f"{e.format_message()} (see '{where} --help')") from None


def _missing_extra(name: str, extra: str, help_text: str, why: str) -> click.Command:
    @click.command(
        name,
        help=f"{help_text}  (Needs: {install_hint(extra)}.)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=True,
    )
    def missing() -> None:
        fail(f"'kew {name}' is not available ({why}); install it with: {install_hint(extra)}")

    return missing


@click.group(cls=KewGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kew", prog_name="kew")
def main() -> None:
    """kew: typed task queues over pluggable brokers.

    MODULE:APP names a kew.task.App (``pkg.module:app`` or ``path/file.py:app``).
    Without an app, --url (default $KEW_URL, else sqlite:///kew.sqlite3) names
    the broker.  Exit codes: 0 done, 1 failed (a task followed, a worker's
    consumer), 2 a mistake (usage, unknown queue or task, unreachable broker).
    """


for _command in (worker, recorder, send, queues, dead, task, tasks):
    main.add_command(_command)
