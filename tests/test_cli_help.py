"""Every `metarec ... --help` renders whole: no option without help, no section name lost, no value shown for a flag."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app
from metarec.config import Config, Section

COMMAND = typer.main.get_command(app)
# every section of the Config model, as a --config file spells it: a section added to Config must appear in the help
SECTIONS = tuple(f"[{name}]" for name, field in Config.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, Section))


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_every_option_has_a_help_line(name):
    command = COMMAND.commands[name]
    missing = [param.opts[0] for param in command.params if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing, f"`metarec {name}`: options without help: {missing}"


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_help_keeps_every_bracketed_name_and_shows_no_value_for_flags(name):
    command = COMMAND.commands[name]
    text = _flat(_help(name))
    for param in command.params:
        for bracketed in re.findall(r"\[[a-z_]+\]", param.help or ""):
            assert bracketed in text, f"`metarec {name} --help` lost {bracketed}"
        if isinstance(param, click.Option) and param.is_flag:
            assert not re.search(re.escape(param.opts[0]) + r"\s+<", text), f"flag {param.opts[0]} is shown taking a value"
    if any("--config" in param.opts for param in command.params):
        assert "TOML file with " + ", ".join(SECTIONS) + " sections." in text
    assert "<bool>" not in text and " , , " not in text


def test_top_level_help_lists_every_command_and_wraps_sentences_only_at_the_width():
    text = _help()
    for name in COMMAND.commands:
        assert re.search(rf"^\s+{name}\s+\S", text, re.M), f"{name} missing from `metarec --help`"
    assert "--set section.field=value < each command's own flags." in _flat(text)
    lines = text.splitlines()
    for line, following in zip(lines, lines[1:]):
        # a description line ends early only where the next word would not have fitted
        if line.startswith("  ") and following.startswith("  ") and following.strip() and not following.lstrip().startswith("-"):
            if line.strip() and not re.match(r"^\s+\S+\s{2,}", following):
                assert len(line) + 1 + len(following.split()[0]) > 80, f"sentence broken early:\n{line}\n{following}"


def test_sections_include_every_config_section():
    assert SECTIONS == ("[data]", "[tasks]", "[meta]", "[baselines]", "[neural]", "[eval]", "[runtime]")


@pytest.mark.parametrize("name", ["", *sorted(COMMAND.commands)])
def test_dash_h_is_help_everywhere(name):
    args = [name] if name else []
    short = CliRunner().invoke(app, [*args, "-h"], terminal_width=80)
    assert short.exit_code == 0, short.output
    assert short.output == _help(*args)


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_every_option_shows_its_default(name):
    command = COMMAND.commands[name]
    ctx = click.Context(command, info_name=name)
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        assert record is not None, f"`metarec {name}`: {param.opts[0]} is hidden"
        assert "[default:" in record[1] or "[required]" in record[1], f"`metarec {name}`: {param.opts[0]} hides its default: {record[1]!r}"


def test_recommend_takes_a_dataset():
    assert "--dataset" in _flat(_help("recommend"))
    params = {p.name for p in COMMAND.commands["recommend"].params}
    assert "dataset" in params
