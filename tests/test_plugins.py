"""The pluggy hooks: third-party strategies are used, built-ins are plugins, errors are clear."""

import logging as std_logging

import pytest
import torch
from helpers import make_llama
from peft import get_peft_model
from transformers.utils import logging

from idlora_trl import IDLoRAConfig, get_indices
from idlora_trl.hookspecs import hookimpl
from idlora_trl.plugins import get_plugin_manager, selection_names


class LargestNormRows:
    """A third-party strategy: the k*r rows of largest norm, in descending order."""

    name = "largest-norm"

    @hookimpl
    def idlora_selection_names(self):
        return ["largest-norm"]

    @hookimpl
    def idlora_select_rows(self, weight, module_name, config):
        if config.selection != "largest-norm":
            return None
        order = weight.norm(dim=1).argsort(descending=True)
        return order[: config.num_clusters * config.r].reshape(config.num_clusters, config.r).cpu()


@pytest.fixture
def largest_norm_plugin():
    plugin = LargestNormRows()
    get_plugin_manager().register(plugin)
    yield plugin
    get_plugin_manager().unregister(plugin)


def test_builtin_strategies_are_plugins():
    names = {name for name, _ in get_plugin_manager().list_name_plugin()}
    assert {"idlora_trl.builtin.pmrc", "idlora_trl.builtin.random", "idlora_trl.builtin.sequential"} <= names
    assert selection_names() == ["pmrc", "pmrc-qr", "random", "sequential"]


def test_third_party_strategy_is_used(largest_norm_plugin):
    assert "largest-norm" in selection_names()
    model = make_llama()
    weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    peft_model = get_peft_model(model, IDLoRAConfig(r=8, num_clusters=2, selection="largest-norm"))
    expected = weight.norm(dim=1).argsort(descending=True)[:16].reshape(2, 8)
    assert torch.equal(get_indices(peft_model)["model.layers.0.mlp.up_proj"], expected)


@pytest.mark.parametrize("typo,meant", [("pmcr", "pmrc"), ("PMRC", "pmrc"), ("pmrc_qr", "pmrc-qr"),
                                        ("randm", "random")])
def test_typo_of_a_builtin_strategy_is_refused_at_config_time(typo, meant):
    with pytest.raises(ValueError, match=rf"invalid selection='{typo}'. Did you mean '{meant}'\?"):
        IDLoRAConfig(selection=typo)


def test_unknown_plugin_strategy_is_refused_before_any_clustering(largest_norm_plugin):
    """A name that is not built in may come from a plugin: the config accepts it without starting the plugin
    manager; injection checks it against the registered plugins before clustering anything."""
    IDLoRAConfig(selection="largest-norm")  # registered: fine
    config = IDLoRAConfig(r=8, num_clusters=2, selection="smallest-norm")
    model = make_llama()
    with pytest.raises(ValueError, match=r"invalid selection='smallest-norm'.*'largest-norm', 'pmrc', 'pmrc-qr', "
                                         r"'random', 'sequential'.*no installed plugin"):
        get_peft_model(model, config)


def test_a_plugin_can_override_a_builtin_strategy():
    class FirstRows:
        @hookimpl(tryfirst=True)
        def idlora_select_rows(self, weight, module_name, config):
            return torch.arange(config.num_clusters * config.r).reshape(config.num_clusters, config.r)

    plugin = FirstRows()
    get_plugin_manager().register(plugin)
    try:
        peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2))
    finally:
        get_plugin_manager().unregister(plugin)
    assert all(t.tolist() == [list(range(8)), list(range(8, 16))] for t in get_indices(peft_model).values())


def test_a_bad_plugin_answer_is_reported_with_the_module():
    class WrongShape:
        @hookimpl(tryfirst=True)
        def idlora_select_rows(self, weight, module_name, config):
            return torch.zeros(3, dtype=torch.long)

    plugin = WrongShape()
    get_plugin_manager().register(plugin)
    try:
        with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.[a-z_.]+' has shape \(3,\)"):
            get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2))
    finally:
        get_plugin_manager().unregister(plugin)


def test_report_logs_the_parameter_table(caplog):
    logging.set_verbosity_info()
    logger = std_logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    try:
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2))
    finally:
        logger.removeHandler(caplog.handler)
        logging.set_verbosity_warning()
    text = caplog.text
    assert "clustered 14 module(s)" in text
    assert "| ID-LoRA r=8 |" in text and "| LoRA r=2 |" in text


def test_decomposition_progress_bar_counts_every_module(monkeypatch):
    """The tqdm bar of the decomposition advances one module at a time and ends at the number of modules."""
    from idlora_trl import skeleton

    bars = []

    class Bar:
        def __init__(self, total, desc, unit, disable):
            self.total, self.desc, self.steps, self.closed = total, desc, [], False
            bars.append(self)

        def update(self, n):
            self.steps.append(n)

        def close(self):
            self.closed = True

    monkeypatch.setattr(skeleton.logging, "tqdm", Bar)
    get_peft_model(make_llama(), IDLoRAConfig(r=4, num_clusters=2, target_modules=["q_proj", "down_proj"]))
    (bar,) = bars
    assert bar.desc == "ID-LoRA decomposition (pmrc)" and bar.closed
    assert sum(bar.steps) == bar.total == 4 and [s for s in bar.steps if s] == [1, 1, 1, 1]
