"""One definition of each choice and of each setting: the CLI flags and the Axolotl `idlora:` block are derived
from `IDLoRAConfig`'s fields (`idlora_trl.settings`), and every front end builds its config in one place."""

import ast
import dataclasses
from pathlib import Path

import pytest

from idlora_trl import IDLoRAConfig
from idlora_trl.config import DISTANCES, ROUTER_NORMS, ROUTERS
from idlora_trl.decomposition import SELECTIONS
from idlora_trl.settings import IDLoRAArguments, METHOD_FIELDS, flag_name, make_config, method_settings
from idlora_trl_app.defaults import SFT_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


def parser_of(command):
    """The `trl.TrlParser` of an `idlora-trl` subcommand."""
    from idlora_trl_app.cli import command_module

    return command_module(command).make_parser()


def actions(parser):
    return {a.dest: a for a in parser._actions}


def test_every_method_field_is_described_from_the_config():
    fields = {f.name: f for f in dataclasses.fields(IDLoRAConfig)}
    arguments = {f.name: f for f in dataclasses.fields(IDLoRAArguments)}
    assert list(arguments) == [flag_name(name) for name in METHOD_FIELDS]
    for item in method_settings():
        field, argument = fields[item.name], arguments[item.flag]
        assert item.flag == flag_name(item.name) and item.flag.startswith("idlora_")
        assert item.default == argument.default == (None if field.default is dataclasses.MISSING else field.default)
        assert item.help == argument.metadata["help"] == field.metadata["help"]
    by_name = {item.name: item for item in method_settings()}
    assert (by_name["router"].choices, by_name["router_norm"].choices, by_name["distance"].choices) == \
        (ROUTERS, ROUTER_NORMS, DISTANCES)
    assert all(name in by_name["selection"].help for name in SELECTIONS)
    assert IDLoRAArguments(idlora_r=8, idlora_router="static").values() == {
        **{item.name: item.default for item in method_settings()}, "r": 8, "router": "static"}


@pytest.mark.parametrize("command", ["sft", "dpo", "decompose", "count", "demo"])
def test_the_flags_are_the_config_fields(command):
    found = actions(parser_of(command))
    for item in method_settings():
        action = found[item.flag]
        assert f"--{item.flag}" in action.option_strings
        assert action.help == item.help
        assert action.default == item.default or item.name == "r", item.name
        assert action.choices == (list(item.choices) if item.choices else None) or \
            tuple(action.choices or ()) == (item.choices or ()), item.name
    r = found["idlora_r"].default
    assert r == (128 if command == "count" else SFT_DEFAULTS["idlora_r"])


def test_axolotl_block_is_derived_from_the_config_fields():
    from idlora_trl.integrations.axolotl.args import TOP_LEVEL, IDLoRABlock, build_config

    assert set(IDLoRABlock.model_fields) == (set(METHOD_FIELDS) - set(TOP_LEVEL)) | {"k"}
    block = IDLoRABlock()
    defaults = IDLoRAConfig()
    for name in set(METHOD_FIELDS) - set(TOP_LEVEL) - {"min_cluster_size", "idlora_alpha"}:
        assert getattr(block, name) == getattr(defaults, name), name
    cfg = {"lora_r": 8, "lora_alpha": 4, "lora_dropout": 0.1, "lora_target_modules": ["q_proj"],
           "idlora": {"k": 2, "router": "static", "router_norm": "rms", "seed": 3}}
    config = build_config(cfg.get)
    assert (config.r, config.idlora_alpha, config.idlora_dropout, config.num_clusters, config.router,
            config.router_norm, config.seed, config.target_modules) == (8, 4, 0.1, 2, "static", "rms", 3, {"q_proj"})


def test_make_config_refuses_unknown_settings():
    assert make_config({"r": 8, "num_clusters": None}).num_clusters == IDLoRAConfig().num_clusters
    with pytest.raises(ValueError, match=r"unknown ID-LoRA setting\(s\) \['clusters'\]"):
        make_config({"clusters": 2})


def test_choices_are_spelt_once():
    """The router, router-norm, distance and selection names appear as a tuple of strings only where they are
    defined (front ends read them from there)."""
    spelt = {("token", "static"): 0, ("none", "rms"): 0, ("euclidean", "cosine"): 0,
             ("pmrc", "pmrc-qr", "random", "sequential"): 0}
    files = list((ROOT / "idlora_trl").rglob("*.py")) + list((ROOT / "integrations").rglob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)):  # Literal["a", "b"] holds a Tuple too
                elements = node.elts
                values = tuple(e.value for e in elements if isinstance(e, ast.Constant))
                if values in spelt and len(values) == len(elements):
                    spelt[values] += 1
    assert all(count == 1 for count in spelt.values()), spelt


PAPER = dict(router="token", router_norm="none", selection="pmrc", distance="euclidean", num_clusters=4,
             rank_boost=2)  # the paper's method, written out here (Eq. 4, PMRC, k = 4, f = 2, no scaling)


def _paper_like(config: IDLoRAConfig, r: int) -> bool:
    return all(getattr(config, k) == v for k, v in PAPER.items()) and config.scaling == 1.0 and \
        config.router_std == 1.0 / r


def test_the_paper_preset_is_the_papers_method_whatever_the_defaults():
    assert _paper_like(IDLoRAConfig(r=16, preset="paper"), 16)
    assert _paper_like(IDLoRAConfig(r=16, preset="paper", router_norm="none", idlora_alpha=16), 16)  # agreeing: kept

    @dataclasses.dataclass
    class LaterDefaults(IDLoRAConfig):  # defaults that differ from the paper, as a rule-chosen default may
        router_norm: str = "rms"
        selection: str = "pmrc-qr"
        num_clusters: int = 2
        idlora_alpha: float = 128.0

    assert not _paper_like(LaterDefaults(r=16), 16)
    assert _paper_like(LaterDefaults(r=16, preset="paper"), 16)
    assert _paper_like(LaterDefaults(r=16, preset="paper", router_norm="rms"), 16)  # "rms" is a default there


def test_the_paper_preset_refuses_a_conflicting_field_and_an_unknown_name():
    with pytest.raises(ValueError, match=r"invalid router_norm='rms' with preset='paper', which sets "
                                         r"router_norm='none'\. Leave router_norm unset"):
        IDLoRAConfig(preset="paper", router_norm="rms")
    with pytest.raises(ValueError, match=r"invalid idlora_alpha=64 with preset='paper'"):
        IDLoRAConfig(r=16, preset="paper", idlora_alpha=64)
    with pytest.raises(ValueError, match=r"invalid preset='papr'\. Choose one of \('paper',\)"):
        IDLoRAConfig(preset="papr")


def test_the_paper_preset_survives_save_and_load_and_every_front_end(tmp_path):
    from idlora_trl.integrations.axolotl.args import build_config

    IDLoRAConfig(r=16, preset="paper", target_modules=["q_proj"]).save_pretrained(tmp_path)
    loaded = IDLoRAConfig.from_pretrained(tmp_path)
    assert loaded.preset == "paper" and _paper_like(loaded, 16)
    args = parser_of("sft").parse_args_and_config(["--idlora_preset", "paper", "--idlora_r", "16"])
    from idlora_trl_app.cli.adapter_config import idlora_config

    assert _paper_like(idlora_config(next(a for a in args if isinstance(a, IDLoRAArguments)), "q_proj"), 16)
    cfg = {"lora_r": 16, "lora_target_modules": ["q_proj"], "idlora": {"preset": "paper"}}
    assert _paper_like(build_config(cfg.get), 16)
