"""The documentation runs: every ```python block of the guides and READMEs is executed.

For each markdown file (``README.md``, ``packages/*/README.md``, ``docs/*.md``,
``docs/guides/*.md``; ``docs/guides/writing-a-plugin.md`` has a test of its own) one test runs
the file's ```python blocks in order, in one fresh namespace, in a temporary working directory
(files an example writes land there), with the Hugging Face libraries offline. The ```console
blocks run too (``docs/guides/cli.md`` is made of them), in document order with the python
blocks: each ``$ adapt ...`` line is run as a subprocess and must exit with 0, and the output
shown under it must appear in what the command printed (in order, whitespace-insensitive; ``…``
matches anything; lines of dashes are skipped, their width depends on what is installed).
Likewise a ```text block right after a python block (one blank line between) shows what that
block prints, and must match it.

A block that must not run is marked by ``<!-- docs: skip -->`` on the line right before its
fence. Other shell commands (``pip install``, ``nox``) go in ```bash blocks, which are not
executed; a ```console block holds ``$ adapt`` commands only.

Other checks, per file: relative links point at files that exist (and at headings that exist,
for ``#anchor`` links into markdown), and the config-field tables of the method guides list
exactly the fields and defaults of the config dataclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Environment for the examples and the CLI runs: Hugging Face offline, headless matplotlib.
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}
# huggingface_hub reads HF_HUB_OFFLINE when it is first imported: set it before any example runs.
os.environ.update(ENV)

#: Markdown files with a test of their own.
OWN_TEST = {"docs/guides/writing-a-plugin.md"}
#: Guides whose examples need the real training clients (TRL, sentence-transformers, datasets):
#: they run in the `clients` nox session, which sets ADAPT_DOCS=clients and installs them;
#: the `docs` session runs every other file (and checks the links of these too).
CLIENT_DOCS = {"docs/guides/training-stacks.md"}
SKIP_MARK = "<!-- docs: skip -->"

#: Method guides and the config class whose fields their first field table documents.
CONFIG_TABLES = {
    "docs/quickstart.md": "adapt.core:AdapterConfig",
    "docs/guides/lora.md": "adapt.lora:LoraConfig",
    "docs/guides/vera.md": "adapt.vera:VeraConfig",
    "docs/guides/adalora.md": "adapt.adalora:AdaLoraConfig",
}


def markdown_files() -> list[str]:
    """Paths (relative to the repo root) of every markdown file whose python blocks run."""
    found = [
        ROOT / "README.md",
        *ROOT.glob("packages/*/README.md"),
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("docs/guides/*.md"),
    ]
    rel = {f.relative_to(ROOT).as_posix() for f in found if f.is_file()}
    return sorted(rel - OWN_TEST)


def example_files() -> list[str]:
    """The files whose examples this run executes: CLIENT_DOCS under ADAPT_DOCS=clients, every
    other file otherwise."""
    if os.environ.get("ADAPT_DOCS") == "clients":
        return sorted(CLIENT_DOCS)
    return [f for f in markdown_files() if f not in CLIENT_DOCS]


# ----------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class Block:
    lang: str
    line: int  # 1-based line number of the block's first code line
    code: str
    skip: bool
    end: int  # 1-based line number of the closing fence


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def parse_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == SKIP_MARK and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            raise AssertionError(
                f"{path}:{i + 1}: {SKIP_MARK} must be on the line right before a code fence"
            )
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        lang = (m["info"].split() or [""])[0].lower()
        skip = i > 0 and lines[i - 1].strip() == SKIP_MARK
        j = i + 1
        while j < len(lines) and not re.fullmatch(
            rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", lines[j]
        ):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{i + 1}: code fence is never closed")
        body = [
            ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]
        ]
        blocks.append(Block(lang, i + 2, "\n".join(body) + "\n", skip, j + 1))
        i = j + 1
    return blocks


# ----------------------------------------------------------------------------- running


def adapt_command() -> list[str]:
    """The `adapt` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "adapt"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "adapt.core.cli"]


def normalise(line: str) -> str:
    return " ".join(line.split())


def shown_line_matches(shown: str, actual_lines: list[str]) -> bool:
    pattern = ".*".join(re.escape(part) for part in normalise(shown).split("…"))
    return any(re.fullmatch(pattern, normalise(a)) for a in actual_lines)


def check_shown_output(where: str, shown: str, printed: str) -> None:
    """Every line ``shown`` appears in ``printed``, in order (whitespace-insensitive, ``…``
    matches anything)."""
    actual = printed.splitlines()
    pos = 0
    for text in shown.splitlines():
        if not text.strip():
            continue
        while pos < len(actual) and not shown_line_matches(text, actual[pos : pos + 1]):
            pos += 1
        assert pos < len(actual), (
            f"{where}: the output shown is not what the example printed; missing (in order) "
            f"{text!r}. It printed:\n{printed}"
        )
        pos += 1


def run_console_block(doc: str, block: Block, cwd: Path) -> None:
    """Run the block's `$ adapt ...` lines; check exit code 0 and the output shown (the lines
    after a command, up to the next one)."""
    commands: list[tuple[int, str, list[str]]] = []  # (line, command, shown output)
    for offset, text in enumerate(block.code.splitlines()):
        if text.startswith("$ "):
            if not text.startswith("$ adapt "):
                raise AssertionError(
                    f"{doc}:{block.line + offset}: only `$ adapt ...` commands run here; put "
                    f"other shell commands in a ```bash block: {text!r}"
                )
            commands.append((block.line + offset, text[2:], []))
        elif commands:
            commands[-1][2].append(text)
        elif text.strip():
            raise AssertionError(f"{doc}:{block.line + offset}: output before any `$ adapt` line")
    for line, command, shown in commands:
        argv = adapt_command() + shlex.split(command)[1:]
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env={**os.environ, **ENV},
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"{doc}:{line}: `{command}` exited with {proc.returncode}:\n{output}"
        )
        # lines of dashes under table headers: their width depends on what is installed
        check_shown_output(
            f"{doc}:{line}: `{command}`",
            "\n".join(t for t in shown if not set(t.strip()) <= {"-", " "}),
            output,
        )


def in_process_entries() -> list[tuple[str, str]]:
    from adapt.core import get_registry

    registry = get_registry()
    return [
        (group, e.name)
        for group in ("adapt.methods", "adapt.layers", "adapt.backends")
        for e in registry.entries(group)
        if e.distribution == "<in-process>"
    ]


@pytest.mark.parametrize("doc", example_files())
def test_doc_examples_run(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / doc
    blocks = parse_blocks(path)
    runnable = [b for b in blocks if not b.skip and b.lang in ("python", "console")]
    if not runnable:
        skipped = sum(b.skip for b in blocks)
        pytest.skip(f"{doc} has no runnable blocks ({skipped} marked {SKIP_MARK})")
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    import torch

    torch.manual_seed(0)
    registered = in_process_entries()
    namespace: dict[str, Any] = {"__name__": "__main__"}
    printed: dict[int, str] = {}  # closing-fence line of a python block -> what it printed
    for block in runnable:
        if block.lang == "console":
            run_console_block(doc, block, tmp_path)
            continue
        # pad so that tracebacks point at the markdown file's own line numbers
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec", dont_inherit=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
        sys.stdout.write(out.getvalue())
        printed[block.end] = out.getvalue()
    # a ```text block right after a python block (one blank line between) shows its output
    for code_block, text_block in itertools.pairwise(blocks):
        if (
            text_block.lang == "text"
            and text_block.line - 2 == code_block.end + 1
            and code_block.end in printed
        ):
            check_shown_output(f"{doc}:{text_block.line}", text_block.code, printed[code_block.end])
    assert in_process_entries() == registered, f"{doc} left plugins registered in-process"


# ----------------------------------------------------------------------------- links


LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.MULTILINE)}


@pytest.mark.parametrize("doc", [*markdown_files(), *sorted(OWN_TEST)])
def test_relative_links_resolve(doc: str) -> None:
    path = ROOT / doc
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.M)
    broken = []
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{doc}: broken links: {broken}"


# ----------------------------------------------------------------------------- config tables


def config_table(doc: str) -> dict[str, str]:
    """``field -> default`` from the first table of ``doc`` whose header starts ``| field |
    default |``; both columns hold backticked code."""
    rows: dict[str, str] = {}
    in_table = False
    for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = line.startswith("|") and cells[:2] == ["field", "default"]
            continue
        if not line.startswith("|"):
            break
        if set(cells[0]) <= {"-", ":"}:
            continue
        field = re.fullmatch(r"`(\w+)`", cells[0])
        default = re.fullmatch(r"`(.*)`", cells[1])
        assert field and default, f"{doc}: malformed config-table row {line!r}"
        rows[field.group(1)] = default.group(1)
    assert rows, f"{doc}: no `| field | default | ...` table found"
    return rows


def documented_fields(cls: type) -> dict[str, str]:
    """``field -> repr(default)`` of the dataclass fields ``cls`` adds to its base."""
    from adapt.core import AdapterConfig

    inherited = (
        set() if cls is AdapterConfig else {f.name for f in dataclasses.fields(AdapterConfig)}
    )
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in inherited:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING
            default = f.default_factory()
        out[f.name] = repr(default)
    return out


@pytest.mark.parametrize("doc", sorted(CONFIG_TABLES))
def test_config_tables_match_the_dataclasses(doc: str) -> None:
    module, _, name = CONFIG_TABLES[doc].partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert config_table(doc) == documented_fields(cls)
