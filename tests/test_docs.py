"""The docs say only what the code does: every ``tadm`` command line in README.md and docs/*.md is one the
real command accepts, every relative link points to a file that exists, and every repository path and
``tadm.`` name the docs show in code exists.

A newcomer copies commands from the docs; a renamed option or a moved page should fail here, not in a
reader's terminal. Each command's options are read from its own ``--help``, run in-process through the
``tadm`` console-script entry point (so renaming a command's module changes nothing here). Commands are
found in shell code blocks (``tadm ...``, ``python -m tadm ...``, ``.venv/bin/tadm ...``, the comments
of those blocks included) and in inline code spans that start with ``tadm``. The Lightning commands'
nested options (``--model.backbone.init_args.pretrained``) are accepted when ``--help`` lists the option
or, for ``X.init_args.*``, when it lists ``X.help``: X takes a class, whose arguments depend on the config.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers import REPO

DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "CONTRIBUTING.md",
    REPO / "benchmarks" / "README.md",
]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "text"}
#: a token after which ``tadm`` is a command, not a word in a sentence
COMMAND_POSITION = {"-m", "srun", "time", "exec", "=", "&&", "||", ";", "|"}
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
#: code spans starting with one of these name a file or folder of the repository
TOP_FOLDERS = (
    "tadm/",
    "components/",
    "datamodules/",
    "configs/",
    "tests/",
    "benchmarks/",
    "docs/",
    "assets/",
)
#: `configs/A/X.yaml`, `runs/<name>/`, `*.png`, `...`: a pattern, not a path
PLACEHOLDER = re.compile(r"[<>*{}\[\]]|\.\.\.|(^|/)[A-Z]{1,2}(\.|/|$)")
#: dotted names that are entry-point groups tadm reads, not modules
ENTRY_POINT_GROUPS = {"tadm.plugins"}


class CommandLine(NamedTuple):
    """One ``tadm`` invocation found in a doc: where, and its arguments after ``tadm``."""

    where: str
    argv: list[str]


def _tadm_main() -> Callable[[list[str]], int]:
    (script,) = entry_points(group="console_scripts", name="tadm")
    return script.load()


@functools.cache
def help_text(*argv: str) -> str:
    """What ``tadm ARGV --help`` prints (``tadm --help`` when ARGV is empty)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = _tadm_main()([*argv, "--help"])
        except SystemExit as stop:
            code = stop.code
    assert code in (0, None), f"tadm {' '.join(argv)} --help exited with {code}"
    return out.getvalue()


def commands() -> set[str]:
    """The command names ``tadm --help`` lists (its indented ``name  description`` lines)."""
    return {m.group(1) for m in re.finditer(r"^  ([a-z][\w-]*)\s{2,}\S", help_text(), re.MULTILINE)}


@functools.cache
def options(*argv: str) -> frozenset[str]:
    """The option strings ``tadm ARGV --help`` lists as entries (not those its descriptions mention)."""
    found: set[str] = set()
    for line in help_text(*argv).splitlines():
        head = re.split(r"\s{2,}", line.strip())[0]
        if head.startswith("-"):
            found.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w.-]*)", head))
    return frozenset(found)


@functools.cache
def actions(command: str) -> frozenset[str]:
    """The sub-actions of a command built with argparse sub-parsers (``tadm study plan|run``), else none."""
    match = re.search(r"\{([\w,-]+)\} \.\.\.", help_text(command))
    return frozenset(match.group(1).split(",")) if match else frozenset()


def option_accepted(option: str, accepted: frozenset[str]) -> bool:
    if option in accepted:
        return True
    group, sep, _ = option.partition(".init_args.")
    return bool(sep) and f"{group}.help" in accepted


def problems(command: CommandLine) -> list[str]:
    """What is wrong with one command line: an unknown command or action, or an option it does not take."""
    if not command.argv or command.argv[0] in ("-h", "--help"):
        return []
    first, rest = command.argv[0], command.argv[1:]
    if first.isupper() or not first.strip("."):  # a placeholder: `tadm COMMAND --help`, `python -m tadm ...`
        return []
    found = []
    known = commands()
    for name in re.split(r"[/|]", first):
        if name not in known:
            found.append(f"{command.where}: `tadm {name}` is not a command (tadm --help: {sorted(known)})")
            continue
        prefix: tuple[str, ...] = (name,)
        if actions(name):
            if not rest or rest[0].startswith("-"):
                continue
            for action in re.split(r"[/|]", rest[0]):
                if action not in actions(name):
                    found.append(
                        f"{command.where}: `tadm {name} {action}`: not one of {sorted(actions(name))}"
                    )
            prefix = (name, re.split(r"[/|]", rest[0])[0])
            if prefix[1] not in actions(name):
                continue
        accepted = options(*prefix)
        for token in rest:
            option = token.strip("[]()").split("=")[0]
            if option.startswith("--") and len(option) > 2 and not option_accepted(option, accepted):
                found.append(f"{command.where}: `tadm {' '.join(prefix)}` takes no {option}")
    return found


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in a comment
        return text.split()


def _invocations(words: list[str], where: str) -> Iterator[CommandLine]:
    """The ``tadm`` commands in one shell line: ``tadm`` (or ``.../tadm``) at a command position."""
    for i, word in enumerate(words):
        if (word == "tadm" or word.endswith("/tadm")) and (i == 0 or words[i - 1] in COMMAND_POSITION):
            argv = []
            for arg in words[i + 1 :]:
                if arg in COMMAND_POSITION - {"-m", "="}:
                    break
                argv.append(arg)
            if argv:  # a bare `tadm` names the tool, it runs nothing
                yield CommandLine(where, argv)


def _spans(text: str, where: str) -> Iterator[CommandLine]:
    """Inline code spans that are whole commands: they start with ``tadm`` or ``python -m tadm``."""
    for match in SPAN.finditer(text):
        words = _words(match.group(1).replace("\\|", "|").replace("\n", " "))
        if words[:1] == ["tadm"] or words[:3] == ["python", "-m", "tadm"]:
            yield from _invocations(words, where)


def command_lines(text: str, name: str) -> list[CommandLine]:
    """Every ``tadm`` command line of a markdown text, in code blocks and in inline code spans."""
    found: list[CommandLine] = []
    prose: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            prose.append(lines[i])
            i += 1
            continue
        start, language, block = i + 1, fence.group(2).lower(), []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            block.append(lines[i])
            i += 1
        i += 1
        prose.extend("" for _ in range(len(block) + 2))  # keep prose line numbers true
        joined, first = "", start + 1
        for number, line in enumerate(block, start + 1):
            code, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line)
            where = f"{name}:{number}"
            if comment:
                found.extend(_spans(comment, where))
                said = _invocations(_words(comment.lstrip("# =").strip()), where)  # `# = tadm study run x`
                found.extend(c for c in said if c.argv[0] in commands() or c.argv[0].startswith("-"))
            if language not in SHELL_LANGUAGES:
                continue
            if not joined:
                first = number
            joined += " " + code.rstrip()
            if joined.endswith("\\"):
                joined = joined[:-1]
                continue
            found.extend(_invocations(_words(joined), f"{name}:{first}"))
            joined = ""
    prose_text = "\n".join(prose)
    for match in SPAN.finditer(prose_text):
        where = f"{name}:{prose_text.count(chr(10), 0, match.start()) + 1}"
        found.extend(_spans(match.group(0), where))
    return found


def relative_links(text: str) -> Iterator[str]:
    for match in LINK.finditer(text):
        target = match.group(1)
        if not re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # not a URL (https:, mailto:) or an anchor
            yield target.split("#")[0]


def missing_links(doc: Path, text: str) -> list[str]:
    return [
        f"{doc.relative_to(REPO)}: ({target}) points to nothing"
        for target in relative_links(text)
        if not (doc.parent / target).exists()
    ]


def _is_dotted_name(text: str) -> bool:
    return bool(re.fullmatch(r"tadm(\.[A-Za-z_]\w*)+", text)) and text not in ENTRY_POINT_GROUPS


def _resolves(name: str) -> bool:
    """Whether ``tadm.a.b.C`` is a module, or an attribute reached from the longest importable module."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def missing_names(text: str, where: str) -> list[str]:
    """Repository paths and ``tadm.`` names in code spans that do not exist."""
    found = []
    for match in re.finditer(r"`([^`\s]+)`", text):
        name = match.group(1).rstrip(",.:;")
        if name.startswith(TOP_FOLDERS) and not PLACEHOLDER.search(name):
            if not (REPO / name.split("::")[0]).exists():
                found.append(f"{where}: `{name}` is not a file or folder of the repository")
        elif _is_dotted_name(name) and not _resolves(name):
            found.append(f"{where}: `{name}` cannot be imported")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_is_one_tadm_accepts(doc: Path) -> None:
    found = command_lines(doc.read_text(), str(doc.relative_to(REPO)))
    wrong = [problem for command in found for problem in problems(command)]
    assert not wrong, "\n".join(wrong)


def test_the_readme_shows_every_command() -> None:
    found = command_lines((REPO / "README.md").read_text(), "README.md")
    shown = {name for command in found if command.argv for name in re.split(r"[/|]", command.argv[0])}
    assert commands() <= shown, f"README.md never shows {sorted(commands() - shown)}"
    assert len(commands()) >= 14  # fit/validate/test/predict and our ten: the help parser found them


def test_the_checker_finds_commands_and_catches_wrong_ones() -> None:
    text = "\n".join(
        [
            "Run `tadm downscale --ckpt C x.png --output lr/ --no-such-option` and `tadm frobnicate`.",
            "```bash",
            "tadm fit --config a.yaml --trainer.max_stepz 3 \\",
            "    --model.nonexistent.init_args.width 1   # then `tadm study walk s.yaml`",
            ".venv/bin/tadm upscale --ckpt C lr/ --output hr/ --save-timesteps",
            "python -m tadm study run s.yaml --cell a --no-compare",
            "make study-demo   # = tadm study plan s.yaml --bogus",
            "```",
            "Fine: `tadm fit --config a.yaml --model.backbone.init_args.pretrained /m --trainer.max_steps 3`,",
            "`tadm downscale/upscale`, `tadm list`, `tadm --help`; not commands: `tadm`, tadm fit --wrong.",
        ]
    )
    found = command_lines(text, "planted.md")
    assert [c.argv[0] for c in found] == [
        "study", "fit", "upscale", "study", "study", "downscale", "frobnicate",
        "fit", "downscale/upscale", "list", "--help",
    ]  # fmt: skip
    wrong = [problem for command in found for problem in problems(command)]
    assert wrong == [
        "planted.md:4: `tadm study walk`: not one of ['plan', 'run']",
        "planted.md:3: `tadm fit` takes no --trainer.max_stepz",
        "planted.md:3: `tadm fit` takes no --model.nonexistent.init_args.width",
        "planted.md:7: `tadm study plan` takes no --bogus",
        "planted.md:1: `tadm downscale` takes no --no-such-option",
        f"planted.md:1: `tadm frobnicate` is not a command (tadm --help: {sorted(commands())})",
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file(doc: Path) -> None:
    text = doc.read_text()
    assert not missing_links(doc, text), "\n".join(missing_links(doc, text))


def test_the_link_checker_catches_a_missing_file() -> None:
    text = "[ok](codec.md) [anchor](#x) [web](https://example.org/a.md) [gone](no_such_page.md#part)"
    assert list(relative_links(text)) == ["codec.md", "no_such_page.md"]
    assert missing_links(REPO / "docs" / "index.md", text) == [
        "docs/index.md: (no_such_page.md) points to nothing"
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_and_name_shown_exists(doc: Path) -> None:
    wrong = missing_names(doc.read_text(), str(doc.relative_to(REPO)))
    assert not wrong, "\n".join(wrong)


def test_the_name_checker_catches_what_is_gone() -> None:
    text = (
        "`tadm/model/enhancer.py` `configs/quickstart.yaml`, `tests/inference/test_tiling.py::LocalToyBackbone` "
        "`tadm.ops.diffusion.FlowTime` `tadm.plugins` `configs/A/X.yaml` `runs/<name>/` "
        "`tadm/model/no_such_module.py` `tadm.no_such_wing.Model` `tadm.ops.diffusion.NoSuchTime`"
    )
    assert missing_names(text, "planted.md") == [
        "planted.md: `tadm/model/no_such_module.py` is not a file or folder of the repository",
        "planted.md: `tadm.no_such_wing.Model` cannot be imported",
        "planted.md: `tadm.ops.diffusion.NoSuchTime` cannot be imported",
    ]
    sources = "".join(path.read_text() for path in (REPO / "tadm").rglob("*.py"))
    assert all(f'"{group}"' in sources for group in ENTRY_POINT_GROUPS)  # the groups tadm really reads


def test_the_codec_python_example_runs_as_written() -> None:
    """docs/codec.md's "From Python" block, run from the repository root in a fresh interpreter: the
    shapes its comments promise, and the plain model pulls in neither Lightning nor diffusers."""
    import subprocess
    import sys

    text = (REPO / "docs" / "codec.md").read_text()
    block = re.search(r"## From Python\n.*?```python\n(.*?)```", text, re.DOTALL)
    assert block, "docs/codec.md: no python block under '## From Python'"
    check = (
        "\nimport sys\n"
        "print(tuple(lr.shape), tuple(hr.shape), float(hr.min()) >= -1, float(hr.max()) <= 1,"
        " 'lightning' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", block.group(1) + check], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "(1, 3, 16, 16) (1, 3, 256, 256) True True False False", done.stdout
