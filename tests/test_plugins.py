"""The pluggy hooks: third-party strategies are used, built-ins are plugins, errors are clear."""

import contextlib
import logging as std_logging

import pytest
import torch
from helpers import ClusteringCounter, make_gpt2, make_llama, registered
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from idlora_trl import IDLoRAConfig, get_indices
from idlora_trl.hookspecs import hookimpl
from idlora_trl.layer import layer_shape
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
def largest_norm_plugin(register_plugin):
    return register_plugin(LargestNormRows())


def test_a_test_plugin_is_unregistered_when_its_block_fails():
    """`helpers.registered`, under the `register_plugin` fixture and the rank scripts, cleans up on an error too."""
    plugin = ClusteringCounter()
    with pytest.raises(RuntimeError, match="the test failed"), registered(plugin):
        assert get_plugin_manager().is_registered(plugin)
        raise RuntimeError("the test failed")
    assert not get_plugin_manager().is_registered(plugin)


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


def test_a_plugin_can_override_a_builtin_strategy(register_plugin):
    class FirstRows:
        @hookimpl(tryfirst=True)
        def idlora_select_rows(self, weight, module_name, config):
            return torch.arange(config.num_clusters * config.r).reshape(config.num_clusters, config.r)

    register_plugin(FirstRows())
    peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2))
    assert all(t.tolist() == [list(range(8)), list(range(8, 16))] for t in get_indices(peft_model).values())


def test_a_bad_plugin_answer_is_reported_with_the_module(register_plugin):
    class WrongShape:
        @hookimpl(tryfirst=True)
        def idlora_select_rows(self, weight, module_name, config):
            return torch.zeros(3, dtype=torch.long)

    register_plugin(WrongShape())
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.[a-z_.]+' has shape \(3,\)"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2))


class RowNumberWeight:
    """A weight context that gives the core its own tensor instead of `module.weight`: row i is all i, in the
    module's stored layout (Conv1D: `[d_in, d_out]`). Records the owner rank it was given."""

    def __init__(self) -> None:
        self.owners: list[int] = []

    @hookimpl(tryfirst=True)
    def idlora_weight_context(self, module, module_name, owner_rank):
        self.owners.append(owner_rank)
        d_out, d_in = layer_shape(module)
        rows = torch.arange(float(d_out))[:, None].expand(d_out, d_in)
        return contextlib.nullcontext((rows.T if isinstance(module, Conv1D) else rows).contiguous())


@pytest.mark.parametrize("maker", [make_llama, make_gpt2])
def test_the_weight_a_context_returns_is_the_one_clustered(largest_norm_plugin, register_plugin, maker):
    """What `__enter__` returns is clustered, not `module.weight`; a Conv1D weight comes in its stored layout."""
    plugin = register_plugin(RowNumberWeight())
    peft_model = get_peft_model(maker(), IDLoRAConfig(r=8, num_clusters=2, selection="largest-norm"))
    indices = get_indices(peft_model)
    assert plugin.owners == [0] * len(indices)  # one process: rank 0 reads every weight
    for name, table in indices.items():  # the largest norms are the last rows, whatever the real weight is
        d_out = layer_shape(peft_model.base_model.model.get_submodule(name).get_base_layer())[0]
        assert table.tolist() == torch.arange(d_out - 1, d_out - 17, -1).reshape(2, 8).tolist(), name


def test_a_weight_context_without_owner_rank_still_works(register_plugin):
    """An implementation written before `owner_rank` existed: pluggy calls it without the argument, and its
    `__enter__` returns itself (not a tensor), so the core reads `module.weight`."""

    class OldStyle:
        entered = 0

        @hookimpl(tryfirst=True)
        def idlora_weight_context(self, module, module_name):
            plugin = self

            class Context:
                def __enter__(self_inner):
                    plugin.entered += 1
                    return self_inner

                def __exit__(self_inner, *exc):
                    return None

            return Context()

    config = IDLoRAConfig(r=8, num_clusters=2, selection="sequential")
    expected = get_indices(get_peft_model(make_llama(), config))
    plugin = register_plugin(OldStyle())
    indices = get_indices(get_peft_model(make_llama(), config))
    assert plugin.entered == len(expected) == 14
    assert all(torch.equal(indices[name], expected[name]) for name in expected)


def test_a_weight_of_the_wrong_shape_from_a_context_is_reported_with_the_module(register_plugin):
    class WrongShape:
        @hookimpl(tryfirst=True)
        def idlora_weight_context(self, module, module_name, owner_rank):
            return contextlib.nullcontext(torch.zeros(3, 5))

    register_plugin(WrongShape())
    with pytest.raises(ValueError, match=r"weight of module 'model\.layers\.\d\.self_attn\.q_proj' on rank 0: "
                                         r"the weight context gave shape \(3, 5\) for \(64, 64\) rows"):
        get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, target_modules=["q_proj"]))


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
