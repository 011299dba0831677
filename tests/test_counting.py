"""Parameter counts on the meta device: the paper's Table 3 figures from Llama-3.2-3B's config alone."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from idlora_trl import IDLoRAConfig, count_parameters, format_parameter_table
from idlora_trl.layer import IDLoRALayer

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_3_2_3b_on_meta() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def percent(trainable, total):
    return round(100 * trainable / total, 2)


def test_paper_table_3_on_the_meta_device():
    lora = get_peft_model(llama_3_2_3b_on_meta(), LoraConfig(r=32, target_modules=SEVEN))
    assert percent(*lora.get_nb_trainable_parameters()) == 1.49

    idlora = get_peft_model(llama_3_2_3b_on_meta(), IDLoRAConfig(r=128, target_modules=SEVEN))
    trainable, total = idlora.get_nb_trainable_parameters()
    assert percent(trainable, total) == 0.77
    # the per-layer formula of the method notes: d_out r / 4 + r, seven projections, 28 layers
    d_out = 3072 + 1024 + 1024 + 3072 + 8192 + 8192 + 3072
    assert trainable == 28 * (d_out * 128 // 4 + 7 * 128)
    # placeholder indices: nothing was clustered, and the layers say so
    layers = [m for m in idlora.modules() if isinstance(m, IDLoRALayer)]
    assert len(layers) == 28 * 7 and not any(m.has_indices("default") for m in layers)

    count = count_parameters(idlora, lora_r=32)
    assert count.idlora == trainable and count.lora == lora.get_nb_trainable_parameters()[0]
    assert round(count.percent(count.idlora, count.base), 2) == 0.77
    assert round(count.percent(count.lora, count.base), 2) == 1.49
    table = format_parameter_table(count)
    assert "| ID-LoRA r=128 | 24,797,696 | 0.77% |" in table
    assert "| LoRA r=32 | 48,627,712 | 1.49% |" in table


@pytest.mark.parametrize("router, rank_boost", [("token", 1), ("token", 2), ("static", 2)])
def test_counts_match_real_parameters(router, rank_boost):
    from helpers import make_llama

    peft_model = get_peft_model(make_llama(), IDLoRAConfig(r=8, num_clusters=2, router=router,
                                                           rank_boost=rank_boost))
    count = count_parameters(peft_model, lora_r=2)
    assert count.idlora == peft_model.get_nb_trainable_parameters()[0]
    lora = get_peft_model(make_llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert count.lora == lora.get_nb_trainable_parameters()[0]
    dora = get_peft_model(make_llama(), LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    assert count.dora == dora.get_nb_trainable_parameters()[0]
