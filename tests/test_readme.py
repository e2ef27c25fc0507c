"""The README's snippets work as written: every Python block runs in a fresh interpreter from the repository
root's recipes (in a scratch folder, so nothing lands in the checkout), and every `mentor ...` command line of
its shell blocks is one the command-line parser accepts, naming recipe files that exist."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAVE_FMNIST

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in ``lang``."""
    out = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M):
        out.append((README[: m.start()].count("\n") + 1, m.group(1)))
    return out


PYTHON = blocks("python")
# A snippet that trains on Fashion-MNIST takes half a minute on 2 cores: it runs with the slow suite.
PYTHON_PARAMS = [pytest.param(n, code, id=f"README.md:{n}",
                              marks=[pytest.mark.slow] if "fmnist" in code or "fashion_mnist" in code else [])
                 for n, code in PYTHON]


def test_the_readme_has_python_snippets():
    assert len(PYTHON) >= 3


@pytest.mark.parametrize("line,code", PYTHON_PARAMS)
def test_python_snippet_runs(line, code, tmp_path):
    if "fashion_mnist" in code or "fmnist" in code:
        if not HAVE_FMNIST:
            pytest.skip("Fashion-MNIST not installed")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MENTOR_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-3000:]}"


def command_lines() -> list[tuple[int, list[str]]]:
    """Each `mentor ...` line of the shell blocks (continuations joined, comments dropped)."""
    out = []
    for line, code in blocks("bash"):
        code = code.replace("\\\n", " ")
        for i, text in enumerate(code.splitlines()):
            text = text.split(" #")[0].strip()
            for part in re.split(r"&&|;", text):
                words = shlex.split(part.strip(), comments=True)
                if words and Path(words[0]).name == "mentor":
                    out.append((line + i + 1, words[1:]))
    return out


COMMANDS = command_lines()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[f"README.md:{n}" for n, _ in COMMANDS])
def test_command_line_parses(line, argv):
    from mentor.cli import build_parser

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help / --version exit 0; a parse error exits 2
        assert e.code == 0, f"README.md:{line}: mentor {' '.join(argv)} is refused by the parser"
        return
    assert all("=" in e for e in extra), f"README.md:{line}: unknown arguments {extra}"
    for word in argv:
        if word.endswith((".yaml", ".yml")) and "=" not in word and not word.startswith(("SWEEP", "RECIPE")):
            if word.startswith("recipes/"):
                assert (ROOT / word).is_file(), f"README.md:{line}: {word} does not exist"


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_doc_links_stay_in_the_repository(doc):
    """Every relative link of the README and docs/*.md names a file of the checkout (no ../shared/...)."""
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"
