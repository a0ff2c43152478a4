"""The documentation site: it builds with `mkdocs build --strict`, every page in the nav exists,
every relative link and image resolves, and what the pages cite (tests, solvers) is real."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import scoresde as sd

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; and HTML src/href attributes.
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
CITED_TEST = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`")


def nav_files(nav) -> list[str]:
    """The page paths of an mkdocs nav (nested lists of {title: path or list})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def relative_targets(markdown: str) -> list[str]:
    """Relative link and image targets outside code, without their #fragments."""
    text = INLINE_CODE.sub("", FENCED_CODE.sub("", markdown))
    targets = MD_LINK.findall(text) + HTML_LINK.findall(text)
    relative = [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", t, re.I)]
    return [t.split("#", 1)[0] for t in relative]


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict` turns every warning (a missing page, a broken link or anchor, an
    API object mkdocstrings cannot find) into a failure."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"
    assert (tmp_path / "site" / "api" / "scoresde" / "index.html").exists()


def test_nav_pages_exist_and_relative_links_resolve():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_files(config["nav"])
    assert {"index.md", "theory.md", "solvers.md", "tuning.md", "models.md", "training.md", "examples.md", "benchmarks.md",
            "reliability.md", "evaluation.md", "superres.md"} <= set(pages)
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist under docs/: {missing}"
    broken = []
    for page in sorted(DOCS.rglob("*.md")):
        for target in relative_targets(page.read_text()):
            if target and not (page.parent / target).resolve().exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "relative links or images that do not resolve:\n" + "\n".join(broken)


@pytest.mark.slow  # over 5 s: in the slow run, to keep the default run within its budget
def test_the_learned_grids_page_python_runs_as_written(tmp_path):
    """docs/tuning.md's ```python blocks, in order, in a fresh interpreter (in a scratch folder: they
    write grid.json)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "tuning.md").read_text(), re.S | re.M)
    assert blocks, "docs/tuning.md has no ```python block"
    code = "import torch\ntorch.set_num_threads(1)\n" + "\n".join(blocks)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"docs/tuning.md's python failed:\n{result.stderr}"
    assert (tmp_path / "grid.json").is_file()


def test_link_check_sees_links_images_and_skips_code():
    """The link finder itself: it must catch what the test above relies on, and only that."""
    text = ("See [a](theory.md#x) and ![b](img/p.png \"t\") and <img src=\"img/q.png\">, not "
            "[web](https://x.org) or [anchor](#y) or `[code](nope.md)`.\n```\n[fenced](nope.md)\n```\n")
    assert relative_targets(text) == ["theory.md", "img/p.png", "img/q.png"]


def test_every_registered_solver_is_in_the_solver_table():
    table_rows = set(re.findall(r"^\| `(\w+)` \|", (DOCS / "solvers.md").read_text(), re.M))
    assert set(sd.SOLVERS) <= table_rows, f"solvers missing from docs/solvers.md: {set(sd.SOLVERS) - table_rows}"


def test_tests_cited_by_the_docs_exist():
    """`tests/file.py::test_name` (and `::other_name` after it on the same line) name real tests."""
    cited = []
    for page in sorted(DOCS.rglob("*.md")):
        for line in page.read_text().splitlines():
            current = None
            for path, name in CITED_TEST.findall(line):
                current = path or current
                assert current, f"{page.name}: `::{name}` without a test file before it on its line"
                cited.append((page.name, current, name))
    assert len(cited) >= 20  # theory.md's table cites at least this many: the pattern still matches
    missing = [c for c in cited if not re.search(rf"^def {c[2]}\(", (ROOT / c[1]).read_text(), re.M)]
    assert not missing, f"tests cited in the docs that do not exist: {missing}"


def test_every_public_name_has_an_api_entry():
    """Each class, function and table that `scoresde` exports is rendered by docs/api/scoresde.md
    (a `::: scoresde...` directive or a `members:` list), so a new export cannot go undocumented."""
    directives = "\n".join(line for line in (DOCS / "api" / "scoresde.md").read_text().splitlines()
                           if line.lstrip().startswith((":::", "members:")))
    exported = [name for name in sd.__all__ if not isinstance(getattr(sd, name), type(sd))]  # not modules
    missing = [name for name in exported if not re.search(rf"\b{name}\b", directives)]
    assert not missing, f"exported by scoresde but absent from docs/api/scoresde.md: {missing}"


def test_extra_javascript_is_vendored_not_fetched():
    """Every script the site loads (MathJax included) is a file under docs/, not a URL: the math must
    render offline, and a CDN entry must not come back unnoticed."""
    scripts = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["extra_javascript"]
    paths = [s if isinstance(s, str) else s["path"] for s in scripts]
    assert any("mathjax" in p.lower() or "tex-" in p for p in paths), paths
    remote = [p for p in paths if re.match(r"^([a-z][a-z0-9+.-]*:)?//", p, re.I)]
    assert not remote, f"extra_javascript loads from the network: {remote}"
    missing = [p for p in paths if not (DOCS / p).is_file()]
    assert not missing, f"extra_javascript entries missing from docs/: {missing}"
