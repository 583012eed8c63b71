"""The documentation: the MkDocs site builds in strict mode, its command line reference is
every command's ``--help``, broken links and anchors fail the build, and the README stays
short and self-contained.

Each build runs ``python -m mkdocs build --strict`` in a subprocess (about a second), with
this tree first on PYTHONPATH so the reference documents the code under test.
"""

from __future__ import annotations

import html
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
import click  # noqa: E402
from click.testing import CliRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs_hooks"))
import cli_reference  # noqa: E402

WIDTH = cli_reference.WIDTH
README_MAX_LINES = 180


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=config.parent)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def copy_docs(tmp: Path) -> Path:
    """docs/, mkdocs.yml, the hook and setup.cfg (the hook reads the commands from it) in ``tmp``."""
    for name in ("docs", "docs_hooks"):
        shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("mkdocs.yml", "setup.cfg"):
        shutil.copy2(ROOT / name, tmp / name)
    return tmp / "mkdocs.yml"


def code_blocks(page: Path) -> str:
    """The text of every <pre><code> block of a built page, unescaped."""
    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", page.read_text(encoding="utf-8"), re.S)
    return "\n".join(html.unescape(b) for b in blocks)


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts, read here rather than through the hook under test."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = parser.get("options.entry_points", "console_scripts").splitlines()
    return {name.strip(): target.strip() for name, _, target in (line.partition("=") for line in lines) if target}


def load(target: str) -> click.Command:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def commands() -> list[tuple[str, list[str]]]:
    """(program, subcommand words) of every console script and every subcommand, found
    with click itself (not the hook's walk), so a command the hook leaves out is missed."""
    out = []

    def visit(program: str, command: click.Command, words: list[str], ctx: click.Context) -> None:
        out.append((program, words))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    visit(program, sub, [*words, name], click.Context(sub, info_name=name, parent=ctx))

    for program, target in console_scripts().items():
        command = load(target)
        visit(program, command, [], click.Context(command, info_name=program))
    return out


def test_every_console_script_and_subcommand_is_found():
    programs = {p for p, _ in commands()}
    assert programs == {"rtfq", "rtfq-train", "rtfq-export", "rtfq-bench", "rtfq-serve"}
    names = {" ".join([p, *w]) for p, w in commands()}
    assert {"rtfq eval", "rtfq data synth", "rtfq fetch", "rtfq-bench run", "rtfq-bench select"} <= names


def test_the_site_builds_in_strict_mode_with_every_page(site: Path):
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").rglob("*.md"))
    for page in pages:
        built = site / ("index.html" if page.name == "index" else page / "index.html")
        assert built.is_file(), f"{page}.md was not built"


def test_the_cli_reference_is_every_commands_help(site: Path):
    text = code_blocks(site / "reference" / "cli" / "index.html")
    runner = CliRunner()
    targets = console_scripts()
    for program, words in commands():
        result = runner.invoke(load(targets[program]), [*words, "--help"], prog_name=program,
                               terminal_width=WIDTH)
        assert result.exit_code == 0, result.output
        expected = result.output.rstrip("\n")
        assert expected.startswith(f"Usage: {' '.join([program, *words])} ")
        assert expected in text, f"the reference page lacks the help of {program} {' '.join(words)}"


def test_a_changed_help_text_changes_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The page is generated, not pasted: the hook renders whatever the command says."""
    from rtfq_deploy.cli.serve import serve

    monkeypatch.setattr(serve, "help", "A help text no release ever had.")
    rendered = cli_reference.render(ROOT)
    assert "A help text no release ever had." in rendered
    assert rendered.count("```text\nUsage: ") == len(commands())


@pytest.mark.parametrize("bad, why", [
    ("See [the design](design.md#no-such-section).", "does not contain an anchor '#no-such-section'"),
    ("See [above](#no-such-anchor).", "no such anchor on this page"),
    ("See [the page](no-such-page.md).", "not found among documentation files"),
    ("See [the tests](../tests/test_docs.py).", "not found among documentation files"),
])
def test_a_broken_link_or_anchor_fails_the_strict_build(tmp_path: Path, bad: str, why: str):
    config = copy_docs(tmp_path)
    assert build(config, tmp_path / "ok").returncode == 0  # the copy builds before the injection
    page = tmp_path / "docs" / "getting-started.md"
    page.write_text(page.read_text(encoding="utf-8") + f"\n{bad}\n", encoding="utf-8")
    result = build(config, tmp_path / "site")
    assert result.returncode != 0
    assert why in result.stderr, result.stderr


def test_a_page_left_out_of_the_navigation_fails_the_strict_build(tmp_path: Path):
    config = copy_docs(tmp_path)
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n", encoding="utf-8")
    result = build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "orphan.md" in result.stderr, result.stderr


README_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)  # not code blocks
    return README_LINK.findall(text)


def heading_ids(markdown: str) -> set[str]:
    """The anchors MkDocs (Python-Markdown's toc) gives a page's headings."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_readme_keeps_the_install_command_ci_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\npython -m pip install -c constraints.txt -e '.[test]' && python -m pytest -q\n" in text
    assert "rtfq demo" in text


def test_the_readme_links_only_inside_the_repository_and_every_link_resolves():
    links = readme_links()
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        assert not re.match(r"[a-z][a-z0-9+.-]*:", path, re.I), f"README links outside the repository: {link}"
        assert not path.startswith("/"), f"README links to an absolute path: {link}"
        target = (ROOT / path).resolve() if path else ROOT / "README.md"
        assert target.is_relative_to(ROOT), f"README links outside the repository: {link}"
        assert target.exists(), f"README links to a missing file: {link}"
        if anchor:
            assert anchor in heading_ids(target.read_text(encoding="utf-8")), f"README links to a missing anchor: {link}"
