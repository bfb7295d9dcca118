"""Every example a user can copy works: each file path named in the README, docs/, launch/,
configs/ and bench/ exists; each config it names loads (with its `:TARGET`); each
`bert-jax` command line parses with the CLI's own parser and config loader; each launch
command passes its script's argument checks (`--dry-run`)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from bert_jax import cli

REPO = Path(__file__).parents[1]
SOURCES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"),
                  *(p for p in (REPO / "launch").rglob("*") if p.is_file()),
                  *(REPO / "configs").rglob("*.py"), *(REPO / "bench").glob("*.py")])
PATH = re.compile(r"(?<![\w/.$])((?:configs|launch|bench|docs|tests|bert_jax)/[\w./-]*\w)"
                  r"(:[\w.-]+)?")
COMMAND_START = re.compile(r"^(?:\$ )?(bert-jax |launch/|sbatch |python3? bench/)")


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def _paths():
    for source in SOURCES:
        for match in PATH.finditer(source.read_text()):
            yield pytest.param(match.group(1), match.group(2),
                               id=f"{_relative(source)}:{match.group(0)}")


def _command_lines(source: Path):
    """Command lines (continuations joined) in a Markdown file's code blocks, or in a
    script's or config's comments, docstrings and usage text: there only lines with an
    option, which prose ("bert-jax pretrain on a TPU slice: ...") has not. A `text` block
    is a program's output (an error message), not a command."""
    text = source.read_text()
    markdown = source.suffix == ".md"
    if markdown:
        text = "\n".join(re.findall(r"```(?!text)[a-z]*\n(.*?)```", text, re.S))
    lines = [re.sub(r"^\s*(?:#\s*)?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        for part in re.split(r"\s*(?:&&|;|\bdo\b)\s*", line):
            if COMMAND_START.match(part) and (markdown or " -" in part):
                yield part.removeprefix("$ ")


def _commands():
    for source in SOURCES:
        for command in _command_lines(source):
            yield pytest.param(command, id=f"{_relative(source)}: {command[:60]}")


@pytest.mark.parametrize("path, target", list(_paths()))
def test_every_named_path_exists_and_every_named_config_loads(path, target):
    assert (REPO / path).exists(), path
    if path.startswith("configs/") and path.endswith(".py") and not (target or ":").isupper():
        cli._load_config(str(REPO / path) + (target or ""), [])


def _check_pretrain_args(args):
    parser = cli.build_parser()
    parsed, overrides = parser.parse_known_args(["pretrain", *args])
    cli._load_config(parsed.config and str(REPO / parsed.config), overrides)


@pytest.mark.parametrize("command", list(_commands()))
def test_every_example_command_parses(command, monkeypatch):
    monkeypatch.chdir(REPO)
    # Shell variables of a documented loop (`for k in 1 3; do ...$k`) take a value.
    argv = shlex.split(re.sub(r"\$\{?\w+\}?", "1", command))
    if argv[0] == "bert-jax":
        parsed, overrides = cli.build_parser().parse_known_args(argv[1:])
        if "config" in parsed:
            default = cli.finetune_default if parsed.command.startswith("finetune") else None
            cli._load_config(parsed.config and str(REPO / parsed.config), overrides, default)
        else:
            assert not overrides, overrides
        return
    if argv[0].startswith("python"):  # a repo script: its --help runs
        result = subprocess.run(["python3", argv[1], "--help"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return
    script = next(a for a in argv if a.startswith("launch/"))
    rest = argv[argv.index(script) + 1:]
    if "--" in rest:
        after = rest[rest.index("--") + 1:]
        if script.endswith("local_multihost.sh"):
            assert after[0] == "bert-jax", after
        else:  # the rest is bert-jax pretrain's
            _check_pretrain_args(after)
    result = subprocess.run(["bash", script, "--dry-run", *rest], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
