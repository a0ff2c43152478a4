"""scoresde/solvers/options.py: declared solver options and their one validator. Every option type
against its good values (normalized) and each kind of bad one (the right error type, a message with
the name, the value's repr and what is allowed); `validate`, `check_declarations` and the catalogue
table they render for docs/validation.md."""
from __future__ import annotations

import dataclasses
import fractions
import math
import re
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scoresde.solvers.options import (Choice, Flag, Integer, Number, Option, Table, catalogue_rows,
                                      check_declarations, validate)
from test_validation_docs import ROW

FAST = settings(max_examples=60, deadline=None)
UNIT = Number(0, 1)
ORDER = Integer(1, 3)
VARIANT = Choice("bh1", "bh2")
ALL_OPTIONS = [UNIT, Number(), Number(0, finite=False), Number(0, low_open=True), ORDER, Integer(),
               VARIANT, Flag(), Table()]
# Anything a caller might pass: every option must return or raise one of its declared errors.
ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300),
                     st.floats(), st.complex_numbers(), st.text(max_size=5), st.binary(max_size=3),
                     st.lists(st.integers(), max_size=2), st.tuples(st.floats()),
                     st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.integers(), max_size=2),
                     st.sampled_from([np.bool_(True), np.int64(2), np.float32(0.5), np.float64("nan"),
                                      torch.tensor(0.5), np.array([1.0]), fractions.Fraction(1, 3)]))


def refused(option: Option, value, error: type, name: str = "opt") -> str:
    """Check that option refuses value with exactly `error` and a complete message; return the message."""
    with pytest.raises((TypeError, ValueError)) as info:
        option.check(name, value)
    assert type(info.value) is error, f"{value!r}: {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert message.startswith(f"{name}={value!r}: expected {option.describe()}"), message
    assert error.__name__ in option.errors()
    return message


# --- Number -------------------------------------------------------------------------------------


@FAST
@given(st.floats(0, 1) | st.integers(0, 1))
def test_number_accepts_the_interval_as_float(value):
    out = UNIT.check("eta", value)
    assert type(out) is float and out == value


@pytest.mark.parametrize("value", [np.float32(0.25), np.float16(0.5), np.int64(1), np.uint8(0),
                                   fractions.Fraction(1, 4)])
def test_number_accepts_numpy_scalars_and_other_reals(value):
    out = UNIT.check("eta", value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(False), "0.5", b"0", None, 0.5j, [0.5], (0.5,),
                                   torch.tensor(0.5), np.array(0.5)])
def test_number_refuses_other_types_bools_included(value):
    refused(UNIT, value, TypeError, name="eta")
    refused(Number(), value, TypeError)


@FAST
@given(st.floats(allow_nan=False).filter(lambda x: not 0 <= x <= 1) | st.integers().filter(lambda n: not 0 <= n <= 1))
def test_number_refuses_values_outside_the_interval(value):
    refused(UNIT, value, ValueError, name="eta")


@pytest.mark.parametrize("option, value", [(Number(0, low_open=True), 0), (Number(0, 1, high_open=True), 1.0),
                                           (Number(high=-1), -0.5), (Number(0, 1, low_open=True), -0.0)])
def test_number_open_ends_are_excluded(option, value):
    refused(option, value, ValueError)
    assert option.check("opt", 0.5 if option.high > 0.5 else -2) in (0.5, -2)


@pytest.mark.parametrize("option", [Number(), Number(finite=False), Number(0, finite=False), UNIT])
@pytest.mark.parametrize("nan", [math.nan, np.float64("nan"), np.float32("nan")])
def test_nan_is_always_a_value_error(option, nan):
    refused(option, nan, ValueError)


@pytest.mark.parametrize("value", [math.inf, -math.inf, np.float64("inf")])
def test_inf_is_refused_by_default_even_where_the_interval_holds_it(value):
    refused(Number(), value, ValueError)
    refused(Number(0), value, ValueError)


def test_inf_is_allowed_with_finite_false_where_the_interval_holds_it():
    s_tmax = Number(0, finite=False)
    assert s_tmax.check("s_tmax", math.inf) == math.inf
    assert s_tmax.check("s_tmax", np.float32("inf")) == math.inf
    refused(s_tmax, -math.inf, ValueError, name="s_tmax")
    refused(Number(0, 1, finite=False), math.inf, ValueError)  # the interval ends at 1
    refused(Number(0, finite=False, high_open=True), math.inf, ValueError)  # (.., inf) excludes inf
    assert Number(finite=False).check("x", -math.inf) == -math.inf


@pytest.mark.parametrize("sign", [1, -1])
def test_huge_ints_count_as_infinite_without_overflow_error(sign):
    huge = sign * 10**400
    refused(Number(), huge, ValueError)
    refused(UNIT, huge, ValueError)
    assert Number(finite=False).check("x", huge) == sign * math.inf
    assert Number(finite=False).check("x", fractions.Fraction(sign * 10**400, 3)) == sign * math.inf
    if sign > 0:
        assert Number(0, finite=False).check("s_tmax", huge) == math.inf
    else:
        refused(Number(0, finite=False), huge, ValueError)


# --- Integer ------------------------------------------------------------------------------------


@FAST
@given(st.integers(1, 3))
def test_integer_accepts_ints_and_numpy_ints_as_int(n):
    for value in (n, np.int64(n), np.uint16(n), np.int8(n)):
        out = ORDER.check("order", value)
        assert type(out) is int and out == n


@pytest.mark.parametrize("value", [True, np.bool_(True), 2.0, np.float64(2), "2", None, fractions.Fraction(2),
                                   torch.tensor(2), [2]])
def test_integer_refuses_other_types_bools_and_integral_floats_included(value):
    refused(ORDER, value, TypeError, name="order")
    refused(Integer(), value, TypeError)


@FAST
@given(st.integers().filter(lambda n: not 1 <= n <= 3) | st.integers(min_value=2**64) | st.integers(max_value=-2**64))
def test_integer_refuses_values_outside_the_range(n):
    refused(ORDER, n, ValueError, name="order")


def test_an_unbounded_integer_has_no_value_error():
    assert Integer().errors() == ("TypeError",)
    assert Integer().check("n", -10**400) == -10**400
    assert Integer(0).errors() == Integer(high=5).errors() == ("TypeError", "ValueError")


# --- Choice -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["bh1", "bh2"])
def test_choice_accepts_its_values(value):
    class Named(str):
        pass

    assert VARIANT.check("variant", value) == value
    out = VARIANT.check("variant", Named(value))
    assert type(out) is str and out == value


@pytest.mark.parametrize("value", [None, 1, b"bh1", ["bh1"], True])
def test_choice_refuses_non_str(value):
    refused(VARIANT, value, TypeError, name="variant")


@pytest.mark.parametrize("value, hint", [("bh3", "; did you mean 'bh"), ("BH2", "; did you mean 'bh2'?"),
                                         ("bh_2", "; did you mean 'bh2'?"), ("runge-kutta", None), ("", None)])
def test_choice_refuses_unknown_str_with_a_close_match_hint(value, hint):
    message = refused(VARIANT, value, ValueError, name="variant")
    if hint is None:
        assert "did you mean" not in message
    else:
        assert hint in message


# --- Flag and Table -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)])
def test_flag_accepts_bools_as_bool(value):
    out = Flag().check("lower_order_final", value)
    assert type(out) is bool and out == bool(value)


@pytest.mark.parametrize("value", [1, 0, 1.0, "yes", "True", "", None, torch.tensor(True), np.array(True), [True]])
def test_flag_refuses_anything_else_with_type_error(value):
    refused(Flag(), value, TypeError, name="lower_order_final")


def test_table_accepts_str_keyed_mappings_as_a_fresh_dict():
    given = {"snr": 0.1}
    out = Table().check("predictor_options", given)
    assert out == given and type(out) is dict and out is not given
    out = Table().check("predictor_options", types.MappingProxyType({"a": [1]}))
    assert type(out) is dict and out == {"a": [1]}
    assert Table().check("predictor_options", {}) == {}


@pytest.mark.parametrize("value", [None, [("a", 1)], "a=1", 1, {("a",)}])
def test_table_refuses_non_mappings(value):
    refused(Table(), value, TypeError, name="predictor_options")


def test_table_refuses_non_str_keys_naming_the_key():
    message = refused(Table(), {"a": 1, 2: "b"}, TypeError, name="predictor_options")
    assert "key 2 is not a str" in message


# --- Every option -------------------------------------------------------------------------------


@FAST
@given(st.sampled_from(ALL_OPTIONS), ANYTHING)
def test_every_option_returns_or_raises_one_of_its_declared_errors(option, value):
    try:
        option.check("x", value)
    except (TypeError, ValueError) as err:
        assert type(err).__name__ in option.errors()
        assert str(err).startswith(f"x={value!r}: expected {option.describe()}")


@pytest.mark.parametrize("option, text", [
    (UNIT, "a number in [0, 1]"),
    (Number(0), "a finite number >= 0"),
    (Number(0, low_open=True), "a finite number > 0"),
    (Number(1e-14, 0.5, low_open=True, high_open=True), "a number in (1e-14, 0.5)"),
    (Number(high=1), "a finite number <= 1"),
    (Number(), "a finite number"),
    (Number(0, finite=False), "a number >= 0 (inf included)"),
    (Number(finite=False), "a number (-inf and inf included)"),
    (Number(0, 1, finite=False), "a number in [0, 1]"),
    (ORDER, "an int in [1, 3]"),
    (Integer(0, 10**7), "an int in [0, 10000000]"),
    (Integer(0), "an int >= 0"),
    (Integer(), "an int"),
    (VARIANT, "one of ('bh1', 'bh2')"),
    (Flag(), "True or False"),
    (Table(), "a dict with str keys"),
])
def test_describe(option, text):
    assert option.describe() == text


def test_options_are_frozen_keyword_only_dataclasses():
    assert dataclasses.is_dataclass(UNIT) and UNIT == Number(0, 1) and hash(UNIT) == hash(Number(0, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        UNIT.low = -1
    with pytest.raises(TypeError):
        Number(0, 1, True)  # low_open and the rest are keyword-only
    assert VARIANT.values == ("bh1", "bh2") and VARIANT == Choice("bh1", "bh2") != Choice("bh2", "bh1")
    with pytest.raises(TypeError):
        Option()  # abstract


# --- validate -----------------------------------------------------------------------------------

EDM = {"s_churn": Number(0), "s_tmin": Number(0), "s_tmax": Number(0, finite=False), "s_noise": Number(0)}
EDM_DEFAULTS = {"s_churn": 0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1}


def test_validate_fills_in_defaults_and_normalizes():
    out = validate("edm", EDM, EDM_DEFAULTS, {"s_churn": np.float32(10), "s_tmin": 1})
    assert out == {"s_churn": 10.0, "s_tmin": 1.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert list(out) == list(EDM) and all(type(v) is float for v in out.values())
    assert validate("euler", {}, {}, {}) == {}


def test_validate_copies_table_defaults():
    default = {"snr": 0.16}
    out = validate("pc", {"predictor_options": Table()}, {"predictor_options": default}, {})
    assert out == {"predictor_options": default} and out["predictor_options"] is not default


@pytest.mark.parametrize("given_, message", [
    ({"etta": 1.0}, "solver 'ddim' got unknown option(s) etta (did you mean 'eta'?); its options: eta"),
    ({"zeta": 1, "b": 2}, "solver 'ddim' got unknown option(s) b, zeta; its options: eta"),
    ({"xyz": 1, "eta": 0.5}, "solver 'ddim' got unknown option(s) xyz; its options: eta"),
])
def test_validate_refuses_unknown_options_like_a_bad_keyword(given_, message):
    with pytest.raises(TypeError) as info:
        validate("ddim", {"eta": UNIT}, {"eta": 0.0}, given_)
    assert str(info.value) == message


def test_validate_names_none_for_a_solver_without_options():
    with pytest.raises(TypeError, match=r"^solver 'euler' got unknown option\(s\) eta; its options: none$"):
        validate("euler", {}, {}, {"eta": 0.0})


@pytest.mark.parametrize("name, value, error", [
    ("eta", 1.5, ValueError), ("eta", "0.5", TypeError), ("eta", True, TypeError), ("eta", math.nan, ValueError),
    ("order", 4, ValueError), ("order", 2.0, TypeError), ("variant", "bh3", ValueError), ("variant", 2, TypeError),
    ("final", "yes", TypeError), ("final", 1, TypeError),
])
def test_validate_refuses_bad_values_naming_the_solver(name, value, error):
    declared = {"eta": UNIT, "order": ORDER, "variant": VARIANT, "final": Flag()}
    defaults = {"eta": 0.0, "order": 2, "variant": "bh2", "final": True}
    with pytest.raises((TypeError, ValueError)) as info:
        validate("mine", declared, defaults, {name: value})
    assert type(info.value) is error
    assert str(info.value).startswith(f"{name}={value!r}: solver 'mine' expects {declared[name].describe()}")


@FAST
@given(st.sampled_from(ALL_OPTIONS), ANYTHING)
def test_validate_raises_what_check_raises(option, value):
    outcomes = []
    for run in (lambda: option.check("x", value), lambda: validate("s", {"x": option}, {}, {"x": value})["x"]):
        try:
            outcomes.append(("ok", run()))
        except (TypeError, ValueError) as err:
            outcomes.append((type(err), None))
    (kind, out), (kind2, out2) = outcomes
    assert kind == kind2
    assert kind != "ok" or (out == out2 or (out != out and out2 != out2))


# --- check_declarations -------------------------------------------------------------------------


def test_check_declarations_accepts_a_consistent_solver():
    assert check_declarations("edm", EDM, EDM_DEFAULTS) is None
    assert check_declarations("euler", {}, {}) is None
    check_declarations("pc", {"predictor": Choice("euler", "ddim"), "options": Table(), "n": Integer(0)},
                       {"predictor": "euler", "options": types.MappingProxyType({}), "n": 1})


@pytest.mark.parametrize("declared, defaults, words", [
    ({"eta": UNIT}, {"eta": 0.0, "beta": 1.0}, ["'beta'", "no declaration"]),
    ({"eta": UNIT, "beta": UNIT}, {"eta": 0.0}, ["'beta'", "no default"]),
    ({"eta": Number}, {"eta": 0.0}, ["'eta'", "not as an Option"]),
    ({"eta": (0, 1)}, {"eta": 0.0}, ["'eta'", "(0, 1)", "not as an Option"]),
    ({"eta": UNIT}, {"eta": 2.0}, ["'eta'", "2.0", "a number in [0, 1]"]),
    ({"eta": UNIT}, {"eta": None}, ["'eta'", "None"]),
    ({"final": Flag()}, {"final": 1}, ["'final'", "True or False"]),
    ({"variant": VARIANT}, {"variant": "bh3"}, ["'variant'", "'bh3'"]),
    ({"s_tmax": Number(0)}, {"s_tmax": math.inf}, ["'s_tmax'", "inf"]),
])
def test_check_declarations_refuses_inconsistent_ones_naming_solver_and_option(declared, defaults, words):
    with pytest.raises(TypeError) as info:
        check_declarations("mine", declared, defaults)
    message = str(info.value)
    assert message.startswith("solver 'mine': ")
    for word in words:
        assert word in message


# --- catalogue_rows -----------------------------------------------------------------------------

CELL_SPLIT = re.compile(r"(?<!\\)\|")


def parse_table(text: str) -> list[list[str]]:
    """The cells of each line of a Markdown table, `\\|` kept inside its cell."""
    rows = []
    for line in text.splitlines():
        assert line.startswith("| ") or line.startswith("|---"), line
        assert line.endswith("|"), line
        rows.append([cell.strip() for cell in CELL_SPLIT.split(line)[1:-1]])
    return rows


def test_catalogue_rows_renders_one_row_per_option():
    entries = [("ddim", {"eta": UNIT}, {"eta": 0.0}), ("euler", {}, {}), ("edm", EDM, EDM_DEFAULTS),
               ("unipc", {"order": ORDER, "variant": VARIANT, "final": Flag()},
                {"order": 2, "variant": "bh2", "final": True})]
    rows = parse_table(catalogue_rows(entries))
    assert rows[0] == ["solver", "option", "default", "allowed", "errors"]
    assert all(set(cell) <= set("-") for cell in rows[1]) and len(rows[1]) == 5
    assert rows[2] == ["`ddim`", "`eta`", "`0.0`", "a number in [0, 1]", "TypeError, ValueError"]
    assert rows[5] == ["`edm`", "`s_tmax`", "`inf`", "a number >= 0 (inf included)", "TypeError, ValueError"]
    assert rows[-1] == ["`unipc`", "`final`", "`True`", "True or False", "TypeError"]
    assert [(r[0], r[1]) for r in rows[2:]] == [(f"`{s}`", f"`{n}`") for s, d, _ in entries for n in d]
    assert all(len(r) == 5 for r in rows)


def test_catalogue_rows_escapes_pipes():
    text = catalogue_rows([("s", {"sep": Choice("a|b", "c")}, {"sep": "a|b"})])
    rows = parse_table(text)
    assert len(rows) == 3 and len(rows[2]) == 5
    assert rows[2][2] == "`'a\\|b'`" and rows[2][3] == "one of ('a\\|b', 'c')"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.from_regex(r"[\w/.]+\.py:[\w.<>]+", fullmatch=True),
                                    st.text(st.characters(codec="ascii"), min_size=1, max_size=12)),
                          st.dictionaries(st.from_regex(r"[\w.:|`]{1,8}", fullmatch=True),
                                          st.sampled_from(ALL_OPTIONS), max_size=3)),
                min_size=1, max_size=3))
def test_catalogue_rows_never_pass_for_raise_sites(solvers):
    entries = [(name, declared, {}) for name, declared in solvers]
    text = catalogue_rows(entries)
    lines = text.splitlines()
    assert len(lines) == 2 + sum(len(d) for _, d in solvers)
    assert not [line for line in lines if ROW.match(line)]
    for line in lines:
        assert len(CELL_SPLIT.split(line)) == 7, line  # five cells: a `|` in a name is escaped
        assert not passes_for_a_raise_site(line)


def passes_for_a_raise_site(line: str) -> bool:
    """Whether the row's first cell, followed by a raise row's cells, would read as a raise site:
    stricter than ROW.match on the row itself, which the default column alone already stops."""
    first = CELL_SPLIT.split(line)[1].strip()
    return bool(ROW.match(f"| {first} | x | TypeError | `m` |"))


def test_the_first_column_never_reads_as_a_raise_site():
    """The premise of the test above, and a solver named like a raise site."""
    assert passes_for_a_raise_site("| `solvers/options.py:validate` | `x` | `True` | True or False | TypeError |")
    row = catalogue_rows([("solvers/options.py:validate", {"x": Flag()}, {"x": True})]).splitlines()[2]
    assert "solvers/options.py:validate" in row and not passes_for_a_raise_site(row) and not ROW.match(row)
