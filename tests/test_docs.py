"""The guides (docs/guide.md and its Chinese translation docs/guide.zh.md) are executed.

How the snippets run:
- A guide is split into sections at its `## N. Title` headings (text before the first
  heading is section 0). Every ```python block of a section runs, in order, in ONE
  namespace shared by that section's blocks and by no other section: a reader can run a
  section top to bottom in one Python session, and a section may build a model once and
  use it in its later blocks. Each section starts from `torch.manual_seed(0)` (the
  autouse fixture in conftest.py) in a fresh temporary working directory that holds a
  copy of configs/, as if run from the repository root.
- ```python no-run blocks are shown but not run (a server, a GPU-only call); shell blocks
  (```bash) never run, but every `lmforge ...` line in them must parse with the CLI's own
  parser (`lmforge.cli.build_parser`), flags and values included.
- A failure names the guide and the section (test ids like `en-s07`), and its traceback
  points at the guide's own line numbers.

Beyond running, the tests check that what the prose names is real: every repository path
(src/lmforge/..., configs/..., ...) exists, every dotted `lmforge.x.y` name resolves, every
`path.py`: `name` pair names something defined in that module, and the two
guides hold the same sections and the same code (comments may be translated).

The worked examples (docs/examples/*.md) show real runs, which take minutes, so they are not
run here: their `lmforge ...` shell lines must parse like the guides' (a command continued
with a trailing backslash is joined first), their Python blocks must compile, the repository
paths they name (scripts/... included) must exist, they name no machine's absolute paths,
and the index (docs/examples/README.md) links every example.
"""

from __future__ import annotations

import importlib
import io
import re
import shlex
import shutil
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = {"en": ROOT / "docs" / "guide.md", "zh": ROOT / "docs" / "guide.zh.md"}
# Commands the guide shows that the CLI does not have yet (their Python functions exist and
# run in the snippets); their lines are parsed as soon as the CLI has them.

FENCE = re.compile(r"^(`{3,})\s*(.*)$")
HEADING = re.compile(r"^## (\d+)\.\s+(.*)$")


@dataclass
class Block:
    lang: str  # "python", "bash", ... ("" when the fence has no info string)
    flags: set[str]  # the info string's other words, e.g. {"no-run"}
    code: str
    line: int  # 1-based line of the first code line in the guide


@dataclass
class Section:
    number: int
    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)


def parse_guide(path: Path) -> list[Section]:
    """Sections (by `## N.` headings) and their fenced code blocks."""
    sections = [Section(0, "introduction", 1)]
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        heading = HEADING.match(lines[i])
        if heading:
            sections.append(Section(int(heading.group(1)), heading.group(2).strip(), i + 1))
        elif fence:
            ticks, info = fence.groups()
            words = info.split()
            start, i = i + 1, i + 1
            while i < len(lines) and not lines[i].startswith(ticks):
                i += 1
            if i == len(lines):
                raise ValueError(f"{path}:{start}: code block never closed")
            sections[-1].blocks.append(Block(words[0] if words else "", set(words[1:]),
                                             "\n".join(lines[start:i]) + "\n", start + 1))
        i += 1
    return sections


def _sections_or_empty(path: Path) -> list[Section]:
    return parse_guide(path) if path.is_file() else []


PARSED = {name: _sections_or_empty(path) for name, path in GUIDES.items()}
EXAMPLES_DIR = ROOT / "docs" / "examples"
EXAMPLES = {f"examples/{p.stem}": p for p in sorted(EXAMPLES_DIR.glob("*.md")) if p.name != "README.md"}
PARSED_EXAMPLES = {name: parse_guide(path) for name, path in EXAMPLES.items()}
EXAMPLES_INDEX = {"examples/README": EXAMPLES_DIR / "README.md"}  # its data commands and Hub-id runs
PARSED_EXAMPLES_INDEX = {name: parse_guide(path) for name, path in EXAMPLES_INDEX.items()}
DOCS = {**GUIDES, **EXAMPLES, **EXAMPLES_INDEX}  # every document whose shell lines must parse
SECTION_CASES = [pytest.param(name, s.number, id=f"{name}-s{s.number:02d}")
                 for name, sections in PARSED.items() for s in sections
                 if any(b.lang == "python" and "no-run" not in b.flags for b in s.blocks)]


def test_both_guides_exist_and_have_sections():
    for name, path in GUIDES.items():
        assert path.is_file(), f"{path} is missing"
        numbers = [s.number for s in PARSED[name][1:]]
        assert numbers == list(range(1, len(numbers) + 1)), f"{name}: sections are not numbered 1..n: {numbers}"
        assert len(numbers) >= 10


@pytest.mark.parametrize("guide, number", SECTION_CASES)
def test_section_snippets_run(guide, number, tmp_path, monkeypatch):
    section = next(s for s in PARSED[guide] if s.number == number)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"guide_{guide}_section_{number}"}
    path = GUIDES[guide]
    for block in section.blocks:
        if block.lang != "python" or "no-run" in block.flags:
            continue
        # Leading newlines make traceback line numbers those of the guide itself.
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        exec(code, namespace)  # noqa: S102 - the guide's snippets are the code under test


def test_python_blocks_compile():
    """Even the no-run blocks must be valid Python."""
    for name, sections in PARSED.items():
        for s in sections:
            for b in s.blocks:
                if b.lang == "python":
                    compile(b.code, f"{GUIDES[name]}:{b.line}", "exec")


def test_no_run_is_rare():
    for name, sections in PARSED.items():
        blocks = [b for s in sections for b in s.blocks if b.lang == "python"]
        skipped = [b.line for b in blocks if "no-run" in b.flags]
        assert len(skipped) <= max(2, len(blocks) // 10), f"{name}: too many no-run blocks at lines {skipped}"


# ----------------------------------------------------------------------------- what the prose names


REPO_PATH = re.compile(r"(?<![\w/.-])((?:src/lmforge|configs|tests|bench|docs)/[\w./-]*\w)", re.ASCII)
DOTTED = re.compile(r"(?<![\w.])lmforge(?:\.[A-Za-z_]\w*)+", re.ASCII)
WHERE = re.compile(r"`(src/lmforge/[\w/]+\.py)`")
TICKED = re.compile(r"`([^`]+)`")
IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", re.ASCII)


def resolve(dotted: str) -> object:
    """Import the longest module prefix of `dotted`, then follow attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def module_of(path: str) -> str:
    """src/lmforge/nn/attention.py -> lmforge.nn.attention."""
    dotted = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    return dotted.removesuffix(".__init__")


@pytest.mark.parametrize("guide", GUIDES)
def test_repository_paths_exist(guide):
    text = GUIDES[guide].read_text(encoding="utf-8")
    paths = sorted(set(REPO_PATH.findall(text)))
    assert paths, "the guide names no repository files"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"{guide}: paths that do not exist: {missing}"


@pytest.mark.parametrize("guide", GUIDES)
def test_dotted_lmforge_names_resolve(guide):
    text = GUIDES[guide].read_text(encoding="utf-8")
    names = sorted(set(DOTTED.findall(text)))
    assert len(names) >= 20
    broken = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            broken.append(f"{name} ({e})")
    assert not broken, f"{guide}: names that do not resolve: {broken}"


def paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each paragraph or list item, wrapped lines joined."""
    items: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        starts_item = line.lstrip().startswith(("- ", "* ")) or re.match(r"\s*\d+\. ", line)
        if not line.strip():
            items.append((n, ""))
        elif starts_item or not items or not items[-1][1]:
            items.append((n, line.strip()))
        else:
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
    return [(n, t) for n, t in items if t]


@pytest.mark.parametrize("guide", GUIDES)
def test_named_functions_live_in_the_named_files(guide):
    """In `src/lmforge/x.py`: `a`, `B.c` — explanation, each identifier between a path and the
    next dash (or the next path) is defined in that module."""
    checked, broken = 0, []
    for n, item in paragraphs(GUIDES[guide].read_text(encoding="utf-8")):
        parts = WHERE.split(item)  # [before, path, after, path, after, ...]
        for path, after in zip(parts[1::2], parts[2::2]):
            module = importlib.import_module(module_of(path))
            for name in TICKED.findall(after.split("\u2014")[0]):
                if not IDENTIFIER.fullmatch(name):
                    continue
                obj = module
                try:
                    for attr in name.split("."):
                        obj = getattr(obj, attr)
                    checked += 1
                except AttributeError:
                    broken.append(f"line {n}: {module.__name__} has no {name}")
    assert not broken, f"{guide}: " + "; ".join(broken)
    assert checked >= 60, f"{guide}: only {checked} `file`: `name` references checked"


SHELL = ("bash", "sh", "shell", "console")


CONTROL = {"|", "||", "&", "&&", ";", ">", ">>", "2>", "2>&1", "<"}


def shell_commands(code: str) -> list[tuple[int, list[str]]]:
    """(line offset, words) of each command of a shell block; a line ending in a backslash
    continues on the next; what follows a pipe, redirection or `&` is not part of it; comments,
    heredoc bodies and blank lines give no command."""
    commands, pending, first, heredoc = [], "", 0, None
    for offset, line in enumerate(code.splitlines()):
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = (pending + line).strip().removeprefix("$ "), ""
        marker = re.search(r"<<-?\s*['\"]?(\w+)", text)
        if marker:
            heredoc, text = marker.group(1), text[:marker.start()]
        words = shlex.split(text, comments=True)
        cut = next((i for i, w in enumerate(words) if w in CONTROL), len(words))
        words = words[:cut]  # the command itself, without its pipe, redirection or `&`
        if words:
            commands.append((first, words))
    return commands


def _command_lines() -> list:
    cases = []
    for doc, sections in {**PARSED, **PARSED_EXAMPLES, **PARSED_EXAMPLES_INDEX}.items():
        for s in sections:
            for b in s.blocks:
                if b.lang not in SHELL:
                    continue
                for offset, words in shell_commands(b.code):
                    if len(words) < 2 or words[0] != "lmforge":
                        continue
                    cases.append(pytest.param(doc, b.line + offset, words[1:],
                                              id=f"{doc}-line{b.line + offset}-{words[1]}"))
    return cases


COMMAND_LINES = _command_lines()


@pytest.mark.parametrize("guide, line, args", COMMAND_LINES)
def test_shell_commands_parse(guide, line, args, monkeypatch):
    """Every `lmforge ...` line of a shell block is accepted by the CLI's own parser (nothing runs)."""
    from lmforge.cli import COMMANDS, build_parser

    assert args[0] in COMMANDS, f"`lmforge {args[0]}` is not a command"
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository root
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{DOCS[guide].relative_to(ROOT)}:{line}: the CLI refuses `lmforge {shlex.join(args)}` "
                    f"(exit {e.code})")


def test_guides_show_commands():
    for guide in GUIDES:
        commands = {args[0] for g, _, args in (c.values for c in COMMAND_LINES) if g == guide}
        assert {"quickstart", "pretrain", "finetune", "generate", "inspect", "plan"} <= commands, guide


# ----------------------------------------------------------------------------- the worked examples


EXAMPLE_PATH = re.compile(r"(?<![\w/.-])((?:src/lmforge|configs|tests|bench|docs|scripts)/[\w./-]*\w)", re.ASCII)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|home|root|work|Users|mnt|opt|var)/")
# The datasets folder kept beside this repository on its developers' machines: a reader has
# only lmforge and a network, so examples download their data (docs/examples/README.md).
SHARED_DATA_PATH = re.compile(r"\.\./shared|shared/data")


def test_examples_index_downloads_every_file_the_examples_read():
    index = EXAMPLES_INDEX["examples/README"].read_text(encoding="utf-8")
    assert not SHARED_DATA_PATH.search(index) and not MACHINE_PATH.search(index)
    read = {m for p in EXAMPLES.values() for m in re.findall(r"data/raw/[\w./$-]+", p.read_text(encoding="utf-8"))}
    written = set(re.findall(r"(?:-o |> )(data/raw/[\w./$-]+)", index)) | set(re.findall(
        r"cp .* (data/raw/\w+)/\n", index))
    for path in read:
        assert any(path == w or path.startswith(w.split("$")[0]) for w in written), f"nothing downloads {path}"


def test_examples_exist_and_are_indexed():
    assert len(EXAMPLES) >= 8, sorted(EXAMPLES)
    index = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    unlisted = [p.name for p in EXAMPLES.values() if f"({p.name})" not in index]
    assert not unlisted, f"docs/examples/README.md does not link {unlisted}"
    assert "(examples/README.md)" in (ROOT / "docs" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_shows_commands_paths_and_code_that_hold(example):
    path = EXAMPLES[example]
    text = path.read_text(encoding="utf-8")
    assert any(g == example for g, _, _ in (c.values for c in COMMAND_LINES)), f"{example}: no `lmforge` command"
    missing = [p for p in sorted(set(EXAMPLE_PATH.findall(text))) if not (ROOT / p).exists()]
    assert not missing, f"{example}: paths that do not exist: {missing}"
    machine = sorted({m.group(0) for m in MACHINE_PATH.finditer(text)})
    assert not machine, f"{example}: names absolute paths of one machine: {machine}"
    assert not SHARED_DATA_PATH.search(text), f"{example}: reads the developers' shared data folder"
    assert "README.md#get-the-data" in text or "data/raw" not in text, f"{example}: says not where data/raw comes from"
    for s in PARSED_EXAMPLES[example]:
        for b in s.blocks:
            if b.lang == "python":
                compile(b.code, f"{path}:{b.line}", "exec")


def test_shell_commands_join_continuations_and_skip_heredocs():
    code = ("lmforge finetune ner \\\n  --model m --out o  # note\npython - <<'EOF'\nlmforge x\nEOF\n\n"
            "lmforge plan > plan.txt &\n")
    assert shell_commands(code) == [(0, ["lmforge", "finetune", "ner", "--model", "m", "--out", "o"]),
                                    (2, ["python", "-"]), (6, ["lmforge", "plan"])]


# ----------------------------------------------------------------------------- the translation


def _code_tokens(code: str) -> list[tuple[int, str]]:
    """Python tokens without comments and layout, so that translated comments compare equal."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in skip]


def _shell_lines(code: str) -> list[str]:
    return [line.split("#")[0].rstrip() for line in code.splitlines() if line.split("#")[0].strip()]


def test_translation_has_the_same_sections_and_code():
    en, zh = PARSED["en"], PARSED["zh"]
    assert [s.number for s in en] == [s.number for s in zh]
    for a, b in zip(en, zh):
        assert [x.lang for x in a.blocks] == [y.lang for y in b.blocks], f"section {a.number}: block kinds differ"
        for x, y in zip(a.blocks, b.blocks):
            where = f"section {a.number}, guide.md:{x.line} vs guide.zh.md:{y.line}"
            assert x.flags == y.flags, where
            if x.lang == "python":
                assert _code_tokens(x.code) == _code_tokens(y.code), f"{where}: the code differs"
            elif x.lang in SHELL:
                assert _shell_lines(x.code) == _shell_lines(y.code), f"{where}: the commands differ"


def test_chinese_guide_is_in_chinese():
    text = GUIDES["zh"].read_text(encoding="utf-8")
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    cjk = len(re.findall(r"[\u4e00-\u9fff]", prose))
    assert cjk > 3000, f"guide.zh.md prose holds only {cjk} Chinese characters"
