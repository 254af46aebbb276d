"""The first hour: help for every option with its default, the README's flags exist, errors before work."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from deepliif.imageio import write_png
from deepliif.model_files import Layout
from engine import commands
from engine.cli import build_parser, main
from engine.samples import synthetic_ihc

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, prefix + (name,))


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    missing = []
    for words, parser in _commands(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help:
                missing.append(f"{' '.join(words)} {name}: no help")
            elif action.default not in (None, False, argparse.SUPPRESS) and not action.required \
                    and "(default: %(default)s)" not in formatter._get_help_string(action):
                missing.append(f"{' '.join(words)} {name}: default not shown")
    assert not missing, missing


def test_help_shows_choices_as_a_user_types_them() -> None:
    """An enum's choices in --help are its values (`{deflate,jpeg}`), not its members' reprs."""
    shown = [f"{' '.join(words)}: {parser.format_usage().strip()}" for words, parser in _commands(build_parser())
             if re.search(r"\{[A-Za-z]+\.[A-Z_]+", parser.format_usage())]
    assert not shown, shown


def _readme_commands() -> list[tuple[str, set[str]]]:
    """(command line start, flags) of every `deepliif-engine ...` line in the README's code blocks."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    joined = "\n".join(re.sub(r"\\\n\s*", " ", block) for block in blocks)
    found = []
    for line in joined.splitlines():
        match = re.match(r"\s*deepliif-engine ((?:[a-z][a-z-]*\s*){1,2})(.*)", line.split("#")[0])
        if match:
            found.append((match.group(1).split(), set(re.findall(r"(--[a-z][a-z0-9-]*)", match.group(2)))))
    return found


def test_every_flag_the_readme_shows_exists_in_that_commands_help() -> None:
    commands = {tuple(words): parser for words, parser in _commands(build_parser())}
    checked = 0
    for words, flags in _readme_commands():
        key = tuple(words[:2]) if tuple(words[:2]) in commands else tuple(words[:1])
        assert key in commands, f"README shows an unknown command: deepliif-engine {' '.join(words)}"
        known = {option for action in commands[key]._actions for option in action.option_strings}
        assert flags <= known, f"deepliif-engine {' '.join(key)}: README flags {sorted(flags - known)} do not exist"
        checked += len(flags)
    assert checked > 50


def test_version_and_quiet_after_the_command(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.match(r"deepliif-engine \S+", capsys.readouterr().out)
    args = build_parser().parse_args(["postprocess", "--image", "a", "--seg", "b", "--out", "c", "-q"])
    assert args.quiet is True
    assert build_parser().parse_args(["postprocess", "--image", "a", "--seg", "b", "--out", "c"]).quiet is False


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was opened before the inputs were checked")
    monkeypatch.setattr(commands, "Session", refuse)


def test_bad_arguments_and_inputs_fail_before_any_model_or_folder(generated_models, tmp_path: Path, capsys,
                                                                  no_model_load) -> None:
    model = str(generated_models[Layout.CHECKPOINT])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["infer", "--model-dir", model, "--out", str(out), "--tile-size", "7", "x.png"])
    assert done.value.code == 2 and "argument --tile-size: must be between 64 and 4096; got 7" in capsys.readouterr().err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["infer", "--model-dir", model, "--out", str(out), str(text)]) == 2
    assert "notes.png: not a readable image" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["infer", "--model-dir", model, "--out", str(out), str(empty)]) == 2
    assert "folder holds no images" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_is_an_input_and_one_image_can_be_chosen(generated_models, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "b.png", synthetic_ihc(seed=1))
    write_png(folder / "a.png", synthetic_ihc(seed=2))
    (folder / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    assert main(["infer", "-q", "--model-dir", str(generated_models[Layout.CHECKPOINT]), "--out", str(out),
                 "--backend", "torch", "--outputs", "Hema", str(folder)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_Hema.png", "a_cells.csv", "a_cells.geojson",
                                                     "b.json", "b_Hema.png", "b_cells.csv", "b_cells.geojson"]
