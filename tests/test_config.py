"""Config paths and keys that do not change the numbers: checkpoints relative to the config file, `download`; the
schema every table is checked with: its keys are what the loader accepts, its errors name the key and what is allowed,
its defaults are the specs', and the docs page shows each key's type, default, allowed values and meaning."""
from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

import pytest

from clebench.sweep import config as schema
from clebench.sweep.config import ConfigError, load_config, parse_config

CONFIG = """
models = [{{ name = "resnet18_cifar10", checkpoint = "{checkpoint}" }}]
steps = ["bn_fold"]
quant = ["w8a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
{data}
"""


def write(folder: Path, checkpoint: str = "../models/r18.pt", data: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.toml"
    path.write_text(CONFIG.format(checkpoint=checkpoint, data=data))
    return path


def test_relative_checkpoint_is_relative_to_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "clone" / "configs")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("clone") / "configs" / "sweep.toml")
    assert config.models[0].checkpoint == str(tmp_path / "clone" / "models" / "r18.pt")


def test_absolute_checkpoint_stays_and_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    absolute = str(tmp_path / "elsewhere" / "r18.pt")
    assert load_config(write(tmp_path / "a", absolute)).models[0].checkpoint == absolute
    assert load_config(write(tmp_path / "b", "~/r18.pt")).models[0].checkpoint == str(tmp_path / "home" / "r18.pt")


def test_hash_and_recorded_config_do_not_depend_on_where_the_repo_is(tmp_path):
    first, second = load_config(write(tmp_path / "one")), load_config(write(tmp_path / "two" / "deeper"))
    assert first.models[0].checkpoint != second.models[0].checkpoint
    assert first.hash == second.hash
    assert first.to_dict()["models"] == [{"name": "resnet18_cifar10", "checkpoint": "../models/r18.pt"}]


def test_download_key_is_parsed_validated_and_not_hashed(tmp_path):
    plain = load_config(write(tmp_path / "plain"))
    fetching = load_config(write(tmp_path / "fetching", data="download = true"))
    assert (plain.data.download, fetching.data.download) == (False, True)
    assert plain.hash == fetching.hash and "download" not in fetching.to_dict()["data"]
    with pytest.raises(ConfigError, match=r"data\.download must be true or false, got 'yes'"):
        load_config(write(tmp_path / "bad", data='download = "yes"'))


def test_committed_configs_keep_their_hashes():
    # results/*/meta.json and results/cifar10_ci/baseline.json were made with these hashes.
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(configs / "cifar10_ci.toml").hash == "47fefcd6a488"
    assert load_config(configs / "imagenet_sample_lite0.toml").hash == "2777652ededf"


# The schema (clebench.sweep.config.SCHEMA): what the loader accepts, what its errors say, what the docs page shows.

def _hook():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "hooks" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROW = {"model": "resnet18_cifar10", "steps": "bn_fold", "quant": "w8a8_per_tensor_minmax"}
BASE = {"models": ["resnet18_cifar10"], "steps": ["bn_fold"], "quant": ["w8a8_per_tensor_minmax"],
        "data": {"dataset": "cifar10"}}
VALIDATED = [schema.TOP, schema.DATA, schema.IMAGEFOLDER, schema.MODEL, schema.EVAL, schema.EXECUTION, schema.ADAROUND,
             schema.ACT_EQUALIZE, schema.BREVITAS, schema.SENSITIVITY, schema.SENSITIVITY_ROW, schema.REPORT]


def _with(table: schema.Table, key: str, value) -> dict:
    """BASE with `key` of `table` set to `value` (the rest of the config valid)."""
    raw = json.loads(json.dumps(BASE))
    if table is schema.TOP:
        raw[key] = value
    elif table in (schema.DATA, schema.IMAGEFOLDER):
        raw["data"] = {"dataset": "imagefolder", "root": "x"} if table is schema.IMAGEFOLDER else raw["data"]
        raw["data"][key] = value
    elif table is schema.MODEL:
        raw["models"] = [{"name": "mine", key: value}]
    elif table is schema.SENSITIVITY_ROW:
        raw["sensitivity"] = {"rows": [{**ROW, key: value}]}
    else:
        raw[table.where] = {key: value}
    return raw


def _path(table: schema.Table, key: str) -> str:
    return {schema.TOP: key, schema.MODEL: f"models.mine.{key}",
            schema.SENSITIVITY_ROW: f"sensitivity.rows[0].{key}"}.get(table, f"{table.where}.{key}")


WRONG_TYPE = {"string": 3, "integer": "7", "number": "0.5", "boolean": "yes", "table": 3, "list": 3,
              "list of strings": 3, "list of numbers": ["a", "b"], "list of integers": "3",
              "string or list of strings": 3, "list of names or tables": 3, "table, list or file": 3}


@pytest.mark.parametrize("table, key", [(table, key) for table in VALIDATED for key in table.keys
                                        if (table, key.name) != (schema.MODEL, "name")],  # name: the entry's label
                         ids=lambda p: p.header or "top" if isinstance(p, schema.Table) else p.name)
def test_a_wrong_type_for_any_key_is_a_one_line_error_naming_it_and_what_is_allowed(table, key):
    with pytest.raises(ConfigError) as error:
        parse_config(_with(table, key.name, WRONG_TYPE[key.type]), "c.toml")
    message = str(error.value)
    assert "\n" not in message and message.startswith("c.toml: ")
    assert f"{_path(table, key.name)} must" in message or f"{_path(table, key.name)}: " in message, message
    if key.check is None and table is not schema.TOP and key is not schema.IMAGEFOLDER["classes"]:  # the schema's words
        assert f"{_path(table, key.name)} {key.must()}, got {WRONG_TYPE[key.type]!r}" in message


@pytest.mark.parametrize("table, key", [(table, key) for table in VALIDATED for key in table.keys
                                        if key.choices is not None or key.low is not None],
                         ids=lambda p: p.header or "top" if isinstance(p, schema.Table) else p.name)
def test_a_value_out_of_choice_or_range_is_an_error_saying_what_is_allowed(table, key):
    if key.choices is not None:
        bad = ["nope"] if key.type.startswith("list") else "nope"
    else:
        bad = key.low - 1 if key.type in ("integer", "number") else [key.low - 1] * (key.length or 1)
    with pytest.raises(ConfigError) as error:
        parse_config(_with(table, key.name, bad), "c.toml")
    message = str(error.value)
    assert "\n" not in message and _path(table, key.name) in message
    assert (key.allowed if key.choices is not None else key.must(item=isinstance(bad, list)).removeprefix("must ")) \
        in message, message


@pytest.mark.parametrize("table", [table for table in VALIDATED if table is not schema.TOP] + [schema.TOP],
                         ids=lambda table: table.header or "top")
def test_the_schema_keys_are_what_the_loader_accepts(table):
    with pytest.raises(ConfigError, match=r"unknown key 'no_such_key' in .*; allowed: (.*)$") as error:
        parse_config(_with(table, "no_such_key", 1))
    accepted = set(str(error.value).split("; allowed: ")[1].split(", "))
    assert accepted == (table.names | schema.DATA.names if table is schema.IMAGEFOLDER else table.names)


def test_the_tables_other_modules_check_declare_the_keys_those_modules_accept():
    from clebench.models.preprocessing import PREPROCESS_KEYS
    from clebench.sweep import custom_steps

    assert schema.PREPROCESS.names == set(PREPROCESS_KEYS)
    assert schema.CUSTOM_STEP.names == custom_steps.KEYS
    tables = {table.header.strip("[]") for table in schema.SCHEMA if re.fullmatch(r"\[\w+\]", table.header)}
    assert schema.TOP.names == {"models", "steps", "quant", "custom_steps", *tables}


def test_the_schema_defaults_are_the_spec_dataclasses_defaults():
    for table in schema.SCHEMA:
        if table.spec is None:
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(table.spec)}
        for key in table.keys:
            if key.name in defaults and key.name not in ("checkpoint", "root"):  # those two: as written, then resolved
                expected = schema.REQUIRED if defaults[key.name] is dataclasses.MISSING else defaults[key.name]
                assert key.default == expected, (table.header, key.name)
    assert parse_config(BASE).data == schema.DataSpec("cifar10")
    plain = parse_config(BASE)
    assert (plain.execution, plain.eval, plain.adaround, plain.act_equalize, plain.brevitas, plain.sensitivity) == (
        schema.ExecutionSpec(), schema.EvalSpec(), schema.AdaroundSpec(), schema.ActEqualizeSpec(),
        schema.BrevitasSpec(), schema.SensitivitySpec())
    assert plain.range_layers == schema.REPORT["range_layers"].default


def test_every_key_of_the_schema_is_on_the_docs_page_with_type_default_allowed_and_meaning():
    hook = _hook()
    page = hook.config_reference()
    for table in schema.SCHEMA:
        start = page.index(f"## `{table.header or 'top level'}`")
        section = page[start:page.index("</table>", start)]
        for key in table.keys:
            row = next((line for line in section.splitlines() if line.startswith(f"<tr><td><code>{key.name}</code>")),
                       None)
            assert row is not None, (table.header, key.name)
            for text in (key.type, hook.default(key), hook.allowed(key), key.doc):
                assert html.escape(text) in row, (table.header, key.name, text)
    assert "## The annotated example" in page and "[adaround]" in page


def test_every_key_of_the_annotated_example_is_a_schema_key():
    hook = _hook()
    example = hook._docstring()[0]
    tables = {}
    for table in schema.SCHEMA:
        tables.setdefault(table.header.split(" ")[0], table)
    current = schema.TOP
    for line in example.splitlines():
        if line.startswith("["):
            current = tables[line.split("#")[0].strip()]
        elif (match := re.match(r"(\w+) = ", line)) is not None:
            names = current.names | (schema.IMAGEFOLDER.names if current is schema.DATA else set())
            assert match[1] in names or current is schema.CUSTOM_STEP, (current.header, match[1])  # NAME = {...}


def test_python_none_is_an_omitted_key_and_a_bad_limit_is_refused_by_the_schema():
    plain = parse_config({**BASE, "execution": {"ray": None, "gpus_per_task": 0.0, "unit": "prefix"}})
    assert plain.execution == schema.ExecutionSpec()
    assert plain.with_limit(None).data.limit is None and plain.with_limit(5).data.limit == 5
    with pytest.raises(ConfigError, match=r"data\.limit must be a positive integer \(or omitted\), got 0"):
        plain.with_limit(0)
    with pytest.raises(ConfigError, match=r"data must be a table .*; it is missing from the top level"):
        parse_config({key: value for key, value in BASE.items() if key != "data"})
