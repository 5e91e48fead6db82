"""The argparse machinery of the ``gcmd`` command line: a parser whose
errors are one line and which knows the keys of ``--config``, and a TOML
``--config`` file read as the values of those flags.

gcmd.cli declares the flags themselves and turns them into settings.
"""

from __future__ import annotations

import argparse
from typing import NoReturn, Protocol

try:
    import tomllib
except ModuleNotFoundError:  # Python before 3.11
    import tomli as tomllib

from gcmd.users import USER_TABLE


class FlagGroup(Protocol):
    """Where flags are added: a parser, an argument group or a mutually exclusive group."""

    def add_argument(self, *names: str, **kwargs) -> argparse.Action: ...


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, and which knows the keys of --config."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: --config keys (the long flag names, without the dashes) -> the flag's Action
        self.keys: dict[str, argparse.Action] = {}

    def setting(self, group: FlagGroup, name: str, **kwargs) -> None:
        """Add the flag ``--name`` to ``group``; ``name`` is also a key of --config files."""
        self.keys[name] = group.add_argument("--" + name, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nTry '{self.prog} --help'.\n")


#: the value of a flag not given (yet), in parse_args' first parse
UNSET = object()


class ReplaceDefault(argparse.Action):
    """Like ``action="append"``, except that the first value on the command line
    replaces the default (a tuple: the --config file's) instead of extending it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = getattr(namespace, self.dest)
        # a list is what the command line gave so far
        setattr(namespace, self.dest, [*(given if isinstance(given, list) else []), values])


def read_config_file(parser: Parser, path: str) -> dict[str, object]:
    """The values a TOML file gives flags, by destination, converted as the flags' own.

    A file that cannot be read or parsed, an unknown key, or a value of the
    wrong shape or type exits through ``parser.error``.
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        parser.error(f"cannot read --config {path}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"--config {path} is not valid TOML: {exc}")
    except UnicodeDecodeError as exc:  # TOML is UTF-8 (tomllib decodes it before parsing)
        parser.error(f"--config {path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} "
                     f"at offset {exc.start}")
    values: dict[str, object] = {}
    keys: dict[str, str] = {}  # destination -> the key that set it
    for key, value in table.items():
        if key == USER_TABLE:
            continue  # the users, read by gcmd.cli.config_users
        action = parser.keys.get(key)
        if action is None:
            parser.error(f"--config {path}: unknown setting '{key}' "
                         f"(the keys are the long flag names, such as max-clients)")
        try:
            converted = file_value(action, key, value)
        except (TypeError, ValueError) as exc:
            parser.error(f"--config {path}: {exc}")
        if converted is None:
            continue  # a switch that is off
        if action.dest in keys:
            parser.error(f"--config {path}: '{keys[action.dest]}' and '{key}' set the same thing: "
                         f"keep one")
        values[action.dest], keys[action.dest] = converted, key
    return values


def file_value(action: argparse.Action, key: str, value: object) -> object:
    """The value of ``key`` in a TOML file as its flag stores it; None for a switch that is off.

    TypeError or ValueError says what is wrong with it.
    """
    if action.nargs == 0:  # a switch: it stores its constant
        if not isinstance(value, bool):
            raise TypeError(f"'{key}' must be true or false")
        return action.const if value else None
    if isinstance(action, ReplaceDefault):
        return tuple(convert(action, key, item) for item in (value if isinstance(value, list) else [value]))
    if isinstance(value, list | dict):
        raise TypeError(f"'{key}' takes one value, not {value!r}")
    return convert(action, key, value)


def convert(action: argparse.Action, key: str, value: object) -> object:
    """One value from a TOML file, read as if it was given on the command line.

    TypeError or ValueError says what is wrong with it.
    """
    if isinstance(value, bool):
        raise TypeError(f"'{key}' takes a value, not {str(value).lower()}")
    text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except ValueError:
        raise ValueError(f"'{key}': invalid {action.type.__name__} value: {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"'{key}': invalid choice: {value!r} "
                         f"(choose from {', '.join(map(repr, action.choices))})")
    return converted
