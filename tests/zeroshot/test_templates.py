"""Prompt-template sets: built-ins, registry, files, class-name files."""

from __future__ import annotations

import json

import pytest

from hf_wemoe.errors import WEMoEError
from hf_wemoe.zeroshot import templates
from hf_wemoe.zeroshot.templates import (
    fill_template,
    get_templates,
    known_template_sets,
    load_classnames,
    register_templates,
    resolve_task_templates,
)


@pytest.fixture
def registry(monkeypatch):
    """Let a test register sets without leaking them into other tests."""
    monkeypatch.setattr(templates, "_SETS", dict(templates._SETS))
    monkeypatch.setattr(templates, "_ALIASES", dict(templates._ALIASES))


def test_builtin_sets_have_the_paper_counts():
    counts = {
        "sun397": 2,
        "stanford-cars": 8,
        "resisc45": 18,
        "eurosat": 3,
        "svhn": 1,
        "gtsrb": 3,
        "mnist": 1,
        "dtd": 8,
    }
    for name, count in counts.items():
        found = get_templates(name)
        assert len(found) == count, name
        assert len(set(found)) == count, f"{name} has duplicate templates"
        assert all("{c}" in t for t in found)
    assert {*counts, "generic"} <= set(known_template_sets())
    assert len(get_templates("generic")) >= 4


def test_builtin_sets_contain_the_documented_examples():
    assert "a photo of a {c}." in get_templates("sun397")
    assert "satellite imagery of {c}." in get_templates("resisc45")
    assert get_templates("mnist") == ['a photo of the number: "{c}".'] == get_templates("svhn")
    assert 'a zoomed in photo of a "{c}" traffic sign.' in get_templates("gtsrb")
    assert "a photo of a {c} texture." in get_templates("dtd")
    assert "a centered satellite photo of {c}." in get_templates("eurosat")
    assert "i love my {c}!" in get_templates("stanford-cars")


@pytest.mark.parametrize(
    "alias", ["cars", "Stanford_Cars", "stanford-cars", "STANFORD CARS", " stanfordcars "]
)
def test_aliases_and_case(alias):
    assert get_templates(alias) == get_templates("stanford-cars")


def test_get_templates_returns_a_copy():
    first = get_templates("sun397")
    first.append("changed {c}")
    assert get_templates("sun397") == ["a photo of a {c}.", "a photo of the {c}."]


def test_register_templates(registry):
    register_templates("Toy_Shapes", ["a drawing of a {c}.", "a {} shape."], aliases=["shapes"])
    assert get_templates("toy-shapes") == ["a drawing of a {c}.", "a {} shape."]
    assert get_templates("SHAPES") == get_templates("toy_shapes")
    assert "toy-shapes" in known_template_sets()
    # Same templates again: fine. Different ones: refused unless overwrite.
    register_templates("toy-shapes", ["a drawing of a {c}.", "a {} shape."])
    with pytest.raises(ValueError, match="already registered"):
        register_templates("toy-shapes", ["other {c}"])
    with pytest.raises(ValueError, match="already registered"):
        register_templates("new-name", ["other {c}"], aliases=["sun397"])
    register_templates("toy-shapes", ["other {c}"], overwrite=True)
    assert get_templates("shapes") == ["other {c}"]


def test_register_refuses_templates_without_placeholder(registry):
    with pytest.raises(WEMoEError, match="placeholder"):
        register_templates("bad", ["a photo of a cat."])
    with pytest.raises(WEMoEError, match="no templates"):
        register_templates("empty", [])


def test_unknown_name_error_names_known_sets_and_options():
    with pytest.raises(WEMoEError) as info:
        get_templates("my-satellites")
    message = str(info.value)
    assert "my-satellites" in message and "eurosat" in message and "generic" in message
    assert "--templates" in message and "--classnames" in message
    assert "\n" not in message


def test_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\na photo of a {c}.\n  a {} in the wild.  \n\n", encoding="utf-8")
    assert get_templates(str(path)) == ["a photo of a {c}.", "a {} in the wild."]
    assert get_templates(path) == ["a photo of a {c}.", "a {} in the wild."]


def test_json_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["itap of a {c}.", 'a "{c}" sign.']), encoding="utf-8")
    assert get_templates(str(path)) == ["itap of a {c}.", 'a "{c}" sign.']
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": ["x {c}"]}), encoding="utf-8")
    with pytest.raises(WEMoEError, match="JSON list"):
        get_templates(str(bad))


def test_file_errors(tmp_path):
    with pytest.raises(WEMoEError, match="not found"):
        get_templates(str(tmp_path / "missing.txt"))
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a {c}.\na photo without the class.\n", encoding="utf-8")
    with pytest.raises(WEMoEError, match=r"template 2 .*placeholder"):
        get_templates(str(path))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(WEMoEError, match="no templates"):
        get_templates(str(empty))


def test_fill_template():
    assert fill_template("a photo of a {c}.", "cat") == "a photo of a cat."
    assert fill_template('a "{}" sign.', "stop") == 'a "stop" sign.'
    # Only the placeholder is substituted: other braces and format fields stay as written.
    assert fill_template("a {c} {x} {0}", "dog") == "a dog {x} {0}"
    with pytest.raises(WEMoEError):
        fill_template("no placeholder", "cat")


def test_resolve_task_templates(tmp_path):
    assert resolve_task_templates("EuroSAT") == get_templates("eurosat")
    assert resolve_task_templates("my_cars", dataset_name="tanganke/stanford_cars") == get_templates("cars")
    assert resolve_task_templates("anything", dataset_name="/data/gtsrb/") == get_templates("gtsrb")
    assert resolve_task_templates("mnist", templates="generic") == get_templates("generic")
    assert resolve_task_templates("mnist", templates=["{c}!"]) == ["{c}!"]
    path = tmp_path / "t.txt"
    path.write_text("x {c}\n", encoding="utf-8")
    assert resolve_task_templates("mnist", templates=str(path)) == ["x {c}"]
    with pytest.raises(WEMoEError, match="task 'mystery'.*--templates"):
        resolve_task_templates("mystery", dataset_name="org/mystery-data")


def test_load_classnames(tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("annual crop land\n\nforest\n  river  \n", encoding="utf-8")
    assert load_classnames(text) == ["annual crop land", "forest", "river"]
    as_json = tmp_path / "classes.json"
    as_json.write_text(json.dumps(["0", "1", 2]), encoding="utf-8")
    assert load_classnames(str(as_json)) == ["0", "1", "2"]


def test_load_classnames_errors(tmp_path):
    with pytest.raises(WEMoEError, match="not found"):
        load_classnames(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(WEMoEError, match="no class names"):
        load_classnames(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n", encoding="utf-8")
    with pytest.raises(WEMoEError, match="duplicate.*cat"):
        load_classnames(dup)
