"""Tiny random models of the real transformers classes, a tokenizer trained here, and planted massive activations.

Planting: a trigger dim K carries 10.0 on the BOS token only (its embedding), and nothing ever writes into K, so
every block's normed input has a clean spike at BOS. One MLP neuron (or one attention head) of one block reads K
and writes a large value into a chosen dim. The scan must then find exactly that block, dim, writer and neuron.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from massact.models.adapters import adapter_for
from massact.models.adapters.base import weight_out_in
from massact.texts import DEFAULT_TEXTS

TRIGGER = 5  # residual dim that carries the planted spike on BOS
D_MODEL, D_MLP, N_LAYERS, N_HEADS, CONTEXT = 64, 256, 4, 4, 64


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few sentences, adding <s> at the start of every text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(list(DEFAULT_TEXTS) * 3, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def tiny_model(family: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                  num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP,
                            bos_token_id=0, eos_token_id=1)
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    return model.eval()


def _isolate_trigger(model, bos: int) -> None:
    """Only BOS carries TRIGGER (value 10), and no sublayer writes into it, in any block."""
    adapter = adapter_for(model.config)
    embed = model.get_input_embeddings().weight
    embed[:, TRIGGER] = 0.0
    embed[bos, TRIGGER] = 10.0
    if hasattr(model, "transformer"):
        model.transformer.wpe.weight[:, TRIGGER] = 0.0
    for layer in range(model.config.num_hidden_layers):
        for path in (adapter.attn_proj, adapter.mlp_down):
            module = adapter.module(model, layer, path)
            weight_out_in(module)[TRIGGER] = 0.0
            if getattr(module, "bias", None) is not None:
                module.bias[TRIGGER] = 0.0


@torch.no_grad()
def plant_mlp(model, bos: int, layer: int, neuron: int, dim: int, out_weight: float = 100.0) -> None:
    """Neuron ``neuron`` of block ``layer`` fires on BOS only and writes ``out_weight`` x its activation into ``dim``."""
    _isolate_trigger(model, bos)
    adapter = adapter_for(model.config)
    for path in (adapter.mlp_up, adapter.mlp_gate):
        if path is None:
            continue
        w = weight_out_in(adapter.module(model, layer, path))
        w[neuron] = 0.0
        w[neuron, TRIGGER] = 2.0
        bias = getattr(adapter.module(model, layer, path), "bias", None)
        if bias is not None:
            bias[neuron] = -4.0  # pre-activation 2 x (~8 at BOS) - 4 > 0; 2 x (~0 elsewhere) - 4 < 0
    weight_out_in(adapter.module(model, layer, adapter.mlp_down))[dim, neuron] = out_weight


@torch.no_grad()
def plant_attention(model, bos: int, layer: int, head: int, dim: int) -> None:
    """Head ``head`` of block ``layer`` reads TRIGGER into its value and writes it, x 250, into ``dim``."""
    _isolate_trigger(model, bos)
    adapter = adapter_for(model.config)
    head_dim = D_MODEL // N_HEADS
    if model.config.model_type == "gpt2":
        c_attn = adapter.module(model, layer, "attn.c_attn")  # Conv1D [in, 3 x d]: q | k | v
        c_attn.weight[TRIGGER, 2 * D_MODEL + head * head_dim] = 5.0
    else:
        kv_head = head // (N_HEADS // model.config.num_key_value_heads)
        adapter.module(model, layer, "self_attn.v_proj").weight[kv_head * head_dim, TRIGGER] = 5.0
    weight_out_in(adapter.module(model, layer, adapter.attn_proj))[dim, head * head_dim] = 50.0


def massact_command(*args) -> list[str]:
    """The command line that runs massact in a fresh interpreter, as a user would."""
    return [sys.executable, "-m", "massact", *map(str, args)]


def run_massact(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(massact_command(*args), capture_output=True, text=True, cwd=cwd, timeout=300)


def save_planted(path: Path, family: str, tokenizer, layer: int, neuron: int, dim: int) -> Path:
    """A tiny model with a planted MLP neuron, saved with its tokenizer as a model directory the CLI can load."""
    model = tiny_model(family, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, layer, neuron, dim)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
