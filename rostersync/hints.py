"""Commands a message tells the operator to run (`rostersync runs approve 2`), written as they
would have to type them: with the ``--config PATH`` the running command was given on its
command line, shell-quoted. A hint without it, pasted by someone whose config is not at the
default place, would fail on /etc/rostersync/rostersync.yaml.

Only a ``--config`` given explicitly is carried: one found through ``$ROSTERSYNC_CONFIG`` or
the default is found the same way by the command pasted. The CLI sets it for the length of a
command (:class:`rostersync.cli.app.App`); elsewhere (tests, an embedding program) there is
none, and a hint is the plain command.
"""

from __future__ import annotations

import shlex

_config_arg: str | None = None


def use_config(path: str | None) -> None:
    """The ``--config`` given on the running command's line, or None (none given, or the
    command has ended)."""
    global _config_arg
    _config_arg = path


def command(args: str) -> str:
    """``rostersync ARGS`` as the operator should type it now (``args``: the subcommand and
    its arguments, already quoted where they need it)."""
    if _config_arg is None:
        return f"rostersync {args}"
    return f"rostersync --config {shlex.quote(_config_arg)} {args}"
