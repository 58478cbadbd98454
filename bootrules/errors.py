"""bootrules' exceptions: each says what is wrong in words a person can act on.

They are turned into messages only at the edges (the command line, an HTTP answer, a log
line), never shown as a traceback. Catch `BootrulesError` for any of them.
"""

from __future__ import annotations


class BootrulesError(Exception):
    """Something bootrules reports to a person, in a line or a few."""


class ProblemsError(BootrulesError):
    """Several things are wrong at once; `problems` has one line for each."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class RulesError(ProblemsError):
    """The rules file (or a file it names) cannot be used; each problem is `file:line: …`.
    `watched`: the other files read (an inventory, templates), so that their fix is noticed."""

    def __init__(self, problems: list[str] | tuple[str, ...], watched: tuple[str, ...] = ()) -> None:
        super().__init__(problems)
        self.watched = tuple(watched)


class SettingsError(ProblemsError):
    """One or more settings are wrong; each problem names its flag or variable."""


class StateError(BootrulesError):
    """The state store cannot be used right now; the message says why in one line."""


class StartError(BootrulesError):
    """`serve` cannot start; the message says why."""


class FactsError(BootrulesError, ValueError):
    """A request's values cannot be what they claim; the message is one line for the user."""
