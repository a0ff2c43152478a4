"""docs/validation.md lists every check in scoresde/ that refuses an input: one row per `raise`,
each naming the function it is in and its error type. Adding a raise without its row, or removing
one and leaving the row, fails here, so the catalogue cannot go stale silently."""
from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scoresde"
CATALOGUE = ROOT / "docs" / "validation.md"
ROW = re.compile(r"^\| `(?P<where>[\w/.]+\.py:[\w.<>]+)` \| [^|]*(?:\\\|[^|]*)* \| (?P<error>\w+) \|")


def raise_sites() -> collections.Counter:
    """(file:function, error type) -> how many `raise Error(...)` the code holds there."""
    sites = collections.Counter()
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()

        def walk(node, scope):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    walk(child, scope + [child.name])
                    continue
                if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                    func = child.exc.func
                    error = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "?")
                    sites[f"{where}:{'.'.join(scope) or '<module>'}", error] += 1
                walk(child, scope)

        walk(ast.parse(path.read_text()), [])
    return sites


def catalogue_rows() -> collections.Counter:
    rows = collections.Counter()
    for line in CATALOGUE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match["where"], match["error"]] += 1
    return rows


def test_the_walk_finds_raises():
    """The premise: the code raises in many places, and the parser reads the catalogue's rows."""
    sites, rows = raise_sites(), catalogue_rows()
    assert sum(sites.values()) > 200 and sum(rows.values()) > 200
    assert sites["solvers/__init__.py:_solver", "TypeError"] >= 1


def test_every_raise_has_its_row_and_every_row_its_raise():
    sites, rows = raise_sites(), catalogue_rows()
    missing = sorted((sites - rows).elements())
    stale = sorted((rows - sites).elements())
    assert not missing, ("raises without a row in docs/validation.md (add one per raise: "
                         f"| `file:function` | argument | Error | message |): {missing}")
    assert not stale, f"rows in docs/validation.md whose raise is gone or changed type: {stale}"


def test_the_solver_options_table_is_generated_from_the_declarations():
    """The solver-option part of the catalogue is the declarations themselves, rendered: a changed or
    new declaration without the regenerated table fails here."""
    from scoresde.solvers import options_table

    text = CATALOGUE.read_text()
    begin, end = "<!-- solver options: generated, do not edit -->", "<!-- end of solver options -->"
    assert begin in text and end in text
    block = text.split(begin)[1].split(end)[0].strip()
    assert block == options_table(), ("docs/validation.md's solver options table is stale; regenerate it with "
                                      "python -c \"import scoresde.solvers as s; print(s.options_table())\"")
