"""Declared solver options and the one check they all go through.

Each solver declares its keyword options once, as a mapping from name to an `Option` (`Number`,
`Integer`, `Choice`, `Flag`, `Table`), beside its defaults. `validate` checks what a caller gives
against those declarations with one rule for every solver: a `TypeError` for a value of the wrong
type, a `ValueError` for a value of the right type outside what is allowed, each message naming the
option, showing the value and saying what is allowed:

    eta=1.5: solver 'ddim' expects a number in [0, 1]

`check_declarations` holds the declarations themselves to account when a solver is registered (every
default declared, every declaration defaulted, every default accepted by its own declaration), and
`catalogue_rows` renders them all as the table of solver options in docs/validation.md.

An option's check does not raise by itself: `Option._parse` returns the normalized value or a
`_Refusal`, and `Option._checked` turns a refusal into the error, so the module raises from four
places only.
"""
from __future__ import annotations

import abc
import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass

import numpy as np

from .._util import interval

_BOOLS = (bool, np.bool_)  # neither is a number here, though Python and numpy would let them count


@dataclass(frozen=True)
class _Refusal:
    """Why `Option._parse` refused a value: the error type's name and a hint for the message."""

    error: str  # "TypeError" or "ValueError"
    hint: str = ""


def _wrong_type(hint: str = "") -> _Refusal:
    return _Refusal("TypeError", hint)


def _wrong_value(hint: str = "") -> _Refusal:
    return _Refusal("ValueError", hint)


def _as_float(value: numbers.Real) -> float:
    """float(value), with an int beyond float range read as +-inf rather than an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


@dataclass(frozen=True)
class Option(abc.ABC):
    """What one solver option allows: the base of `Number`, `Integer`, `Choice`, `Flag` and `Table`."""

    def check(self, name: str, value: object) -> object:
        """The value, normalized (a float for `Number`, an int for `Integer`, ...), if this option allows it.

        Args:
            name: The option's name, for the message.
            value: What the caller gave.

        Returns:
            The normalized value.

        Raises:
            TypeError: The value is of a type this option does not take.
            ValueError: The value has the right type but lies outside what this option allows.
        """
        return self._checked(name, value, "expected")

    @abc.abstractmethod
    def describe(self) -> str:
        """What this option allows, in words: "a number in [0, 1]", "one of ('bh1', 'bh2')".

        Returns:
            The description that error messages and the catalogue show.
        """

    def errors(self) -> tuple[str, ...]:
        """The names of the error types `check` can raise.

        Returns:
            A tuple such as ("TypeError", "ValueError").
        """
        return ("TypeError", "ValueError")

    @abc.abstractmethod
    def _parse(self, value: object) -> object:
        """The normalized value, or a `_Refusal` saying why not (never raises)."""

    def _checked(self, name: str, value: object, expects: str) -> object:
        """`check`, with the message's verb phrase ("expected", "solver 'ddim' expects") given."""
        result = self._parse(value)
        if not isinstance(result, _Refusal):
            return result
        message = f"{name}={value!r}: {expects} {self.describe()}{result.hint}"
        if result.error == "TypeError":
            raise TypeError(message)
        raise ValueError(message)


@dataclass(frozen=True)
class Number(Option):
    """A real number (int, float, numpy real; not a bool, a str or a tensor) in an interval, as a float.

    NaN is always refused; inf and -inf are refused unless `finite` is False and the interval holds
    them. An int beyond float range counts as inf or -inf.

    Args:
        low: The interval's lower end.
        high: The interval's upper end.
        low_open: Whether `low` itself is excluded.
        high_open: Whether `high` itself is excluded.
        finite: Whether inf and -inf are refused even where the interval holds them.
    """

    low: float = -math.inf
    high: float = math.inf
    _: KW_ONLY
    low_open: bool = False
    high_open: bool = False
    finite: bool = True

    def describe(self) -> str:
        unbounded = self.low == -math.inf or self.high == math.inf
        kind = "a finite number" if self.finite and unbounded else "a number"
        infinities = [] if self.finite else [s for s, x in (("-inf", -math.inf), ("inf", math.inf)) if self._holds(x)]
        extra = f" ({' and '.join(infinities)} included)" if infinities else ""
        return kind + interval(self.low, self.high, self.low_open, self.high_open) + extra

    def _holds(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below and not (self.finite and math.isinf(x))  # NaN fails both comparisons

    def _parse(self, value: object) -> object:
        if isinstance(value, _BOOLS) or not isinstance(value, numbers.Real):
            return _wrong_type()
        x = _as_float(value)
        return x if self._holds(x) else _wrong_value()


@dataclass(frozen=True)
class Integer(Option):
    """An int (not a bool; numpy integers too) in [low, high], as a Python int.

    Args:
        low: The least value allowed.
        high: The greatest value allowed.
    """

    low: float = -math.inf
    high: float = math.inf

    def describe(self) -> str:
        return "an int" + interval(self.low, self.high)

    def errors(self) -> tuple[str, ...]:
        bounded = self.low > -math.inf or self.high < math.inf
        return super().errors() if bounded else ("TypeError",)

    def _parse(self, value: object) -> object:
        if isinstance(value, _BOOLS) or not isinstance(value, numbers.Integral):
            return _wrong_type()
        n = int(value)
        return n if self.low <= n <= self.high else _wrong_value()


@dataclass(frozen=True, init=False)
class Choice(Option):
    """A str among a fixed set of values; an unknown one is refused with the closest value as a hint.

    Args:
        *values: The values allowed.
    """

    values: tuple[str, ...]

    def __init__(self, *values: str) -> None:
        object.__setattr__(self, "values", tuple(values))

    def describe(self) -> str:
        return f"one of {self.values!r}"

    def _parse(self, value: object) -> object:
        if not isinstance(value, str):
            return _wrong_type()
        if value in self.values:
            return str(value)
        lowered = {v.lower(): v for v in self.values if isinstance(v, str)}
        close = difflib.get_close_matches(value.lower(), lowered, n=1)
        return _wrong_value(f"; did you mean {lowered[close[0]]!r}?" if close else "")


@dataclass(frozen=True)
class Flag(Option):
    """Exactly True or False (a bool or a numpy.bool_), nothing that merely converts to one."""

    def describe(self) -> str:
        return "True or False"

    def errors(self) -> tuple[str, ...]:
        return ("TypeError",)

    def _parse(self, value: object) -> object:
        return bool(value) if isinstance(value, _BOOLS) else _wrong_type()


@dataclass(frozen=True)
class Table(Option):
    """A dict (any mapping) with str keys, returned as a fresh dict; its values are checked elsewhere."""

    def describe(self) -> str:
        return "a dict with str keys"

    def errors(self) -> tuple[str, ...]:
        return ("TypeError",)

    def _parse(self, value: object) -> object:
        if not isinstance(value, Mapping):
            return _wrong_type()
        bad = [key for key in value if not isinstance(key, str)]
        return _wrong_type(f"; key {bad[0]!r} is not a str") if bad else dict(value)


def _close_hint(unknown: list, known: Iterable[str]) -> str:
    """' (did you mean 'eta'?)' for a single unknown name close to a known one, else ''."""
    if len(unknown) != 1 or not isinstance(unknown[0], str):
        return ""
    close = difflib.get_close_matches(unknown[0], list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_known(solver: str, declared: Mapping[str, Option], given: Mapping[str, object]) -> None:
    unknown = sorted((key for key in given if key not in declared), key=str)
    if unknown:
        allowed = ", ".join(declared) or "none"
        raise TypeError(f"solver {solver!r} got unknown option(s) {', '.join(map(str, unknown))}"
                        f"{_close_hint(unknown, declared)}; its options: {allowed}")


def validate(solver: str, declared: Mapping[str, Option], defaults: Mapping[str, object],
             given: Mapping[str, object]) -> dict:
    """Check the options a caller gave a solver, and fill in the rest from the defaults.

    Args:
        solver: The solver's name, for the messages.
        declared: Option name -> what it allows (as passed `check_declarations`).
        defaults: Option name -> its default, one for each declared option.
        given: The options the caller gave.

    Returns:
        Option name -> normalized value for every declared option, in declaration order: a given
        value where there is one, else the default (run through the same check, so that it is
        normalized and a `Table` default is a fresh copy).

    Raises:
        TypeError: An option the solver does not declare (named, with the closest declared name as
            a hint), or a value of the wrong type.
        ValueError: A value of the right type outside what its option allows.
    """
    _check_known(solver, declared, given)
    expects = f"solver {solver!r} expects"
    return {name: option._checked(name, given[name] if name in given else defaults[name], expects)
            for name, option in declared.items()}


def _declaration_problems(declared: Mapping[str, Option], defaults: Mapping[str, object]) -> list[str]:
    problems = [f"option {name!r} has a default but no declaration" for name in defaults if name not in declared]
    for name, option in declared.items():
        if not isinstance(option, Option):
            problems.append(f"option {name!r} is declared as {option!r}, not as an Option "
                            "(Number, Integer, Choice, Flag or Table)")
        elif name not in defaults:
            problems.append(f"option {name!r} is declared but has no default")
        elif isinstance(option._parse(defaults[name]), _Refusal):
            problems.append(f"option {name!r} defaults to {defaults[name]!r}, which its own declaration "
                            f"refuses: it expects {option.describe()}")
    return problems


def check_declarations(solver: str, declared: Mapping[str, Option], defaults: Mapping[str, object]) -> None:
    """Hold a solver's declarations to account when it is registered, so no default is ever refused.

    Args:
        solver: The solver's name, for the message.
        declared: Option name -> what it allows.
        defaults: Option name -> its default (from the solver function's signature).

    Raises:
        TypeError: A default without a declaration, a declaration without a default, a declaration
            that is not an `Option`, or a default its own declaration refuses (every problem named
            in one message).
    """
    problems = _declaration_problems(declared, defaults)
    if problems:
        raise TypeError(f"solver {solver!r}: " + "; ".join(problems))


def _cell(text: str, code: bool = False) -> str:
    """Text for one Markdown table cell: `|` escaped, on one line, in a code span if asked."""
    text = " ".join(str(text).splitlines()).replace("|", "\\|")
    if not code:
        return text
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _solver_cell(solver: str) -> str:
    # A code span reading like `file.py:function` would pass for a raise site in docs/validation.md
    # (tests/test_validation_docs.py): such a name goes in as plain text.
    return _cell(solver, code=".py:" not in solver)


def catalogue_rows(entries: Iterable[tuple[str, Mapping[str, Option], Mapping[str, object]]]) -> str:
    """The Markdown table of every solver's options, for docs/validation.md.

    Args:
        entries: (solver name, declared options, defaults) for each solver, in the order to list
            them; each solver's options in its declaration order.

    Returns:
        The table (a header and one row per solver option, lines joined by newlines, no trailing
        newline): solver, option, default, what is allowed, the errors its check raises.
    """
    lines = ["| solver | option | default | allowed | errors |", "|---|---|---|---|---|"]
    for solver, declared, defaults in entries:
        for name, option in declared.items():
            default = _cell(repr(defaults[name]), code=True) if name in defaults else "(none)"
            lines.append(f"| {_solver_cell(solver)} | {_cell(name, code=True)} | {default} | "
                         f"{_cell(option.describe())} | {', '.join(option.errors())} |")
    return "\n".join(lines)
