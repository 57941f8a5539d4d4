"""Tiny random models of the real transformers classes, a tokenizer trained here, and planted massive activations.

Planting: a trigger dim K carries 10.0 on the BOS token only (its embedding), and nothing ever writes into K, so
every block's normed input has a clean spike at BOS. One MLP neuron (or one attention head) of one block reads K
and writes a large value into a chosen dim. The scan must then find exactly that block, dim, writer and neuron.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from massact.models.adapters import adapter_for
from massact.models.adapters.base import text_config
from massact.texts import DEFAULT_TEXTS

# Under pytest-xdist (``make test`` runs a worker per core) each worker takes its share of the cores: torch's own
# threads on top of the workers would oversubscribe them, and then every small op waits for a core. The environment
# variable reaches the command lines the tests start.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

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


# Every family massact has an adapter for, by a short name; variants of one model type get their own name.
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3", "neox", "neox-seq",
            "gptj", "falcon", "falcon-seq", "opt", "opt-postln", "bert", "roberta",
            # The newer dense and hybrid families.
            "olmo2", "olmo3", "exaone4", "cohere2", "seed_oss", "apertus", "smollm3", "lfm2", "qwen3_next", "qwen3_5",
            "gemma3mm", "gemma4",
            # Plain-layout decoders: Llama's block with its scales (Granite), its norms (OLMo, GLM-4, StarCoder2), its MLP
            # (GLM-4, StarCoder2) or its attention (Ministral, Ministral-3) changed.
            "granite", "olmo", "glm4", "starcoder2", "internlm3", "ministral", "ministral3",
            # State-space and other hybrids: blocks of one sublayer, Mamba mixers, linear attention.
            "nemotron_h", "bamba", "olmo_hybrid", "lfm3", "jamba", "kimi_linear", "granitemoehybrid",
            # A Mamba-2 scan and softmax attention side by side in every block, their outputs summed into one branch.
            "falcon_h1"]
# Hybrids: each block's token mixer, as their tiny configs set it.
MIXERS = {"lfm2": ["conv", "attention", "conv", "attention"], "qwen3_next": ["linear", "linear", "linear", "attention"],
          "qwen3_5": ["linear", "linear", "linear", "attention"], "nemotron_h": ["ssm", None, "attention", None],
          "bamba": ["ssm", "ssm", "attention", "ssm"], "jamba": ["ssm", "attention", "ssm", "attention"],
          "olmo_hybrid": ["linear", "linear", "linear", "attention"], "lfm3": ["conv", "conv", "attention", "conv"],
          "kimi_linear": ["linear", "attention", "linear", "attention"],
          "granitemoehybrid": ["ssm", "attention", "ssm", "attention"],
          "granitemoehybrid_moe": ["ssm", "attention", "ssm", "attention"],
          "nemotron_h_moe": ["ssm", None, "attention", None], "nemotron_h_latent": ["ssm", None, "attention", None],
          "jamba_moe": ["ssm", "attention", "ssm", "attention"], "kimi_linear_moe": ["linear", "attention", "linear", "attention"]}
# Mixtures of experts: their MLP sites are inside fused experts (see massact.capture.routing).
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe", "llama4",
                "qwen3_next_moe", "qwen3_5_moe", "deepseek_v32", "glm_moe_dsa", "minimax_m2", "ernie4_5_moe", "exaone_moe",
                "cohere2_moe", "afmoe", "mimo_v2_flash", "laguna", "nemotron_h_moe", "nemotron_h_latent", "jamba_moe",
                "kimi_linear_moe", "granitemoehybrid_moe", "gemma4_moe"]
# Families whose biases start at random values (transformers starts them at 0, which would hide a recomputation that
# leaves them out).
RANDOM_BIASES = {"nemotron_h_latent"}
# Experts beside a dense MLP in every block (Gemma-4's MoE block): planted in an expert with MOE_FAMILIES, and in a
# dense neuron with FAMILIES (tests that plant a dense neuron run FAMILIES + BESIDE_FAMILIES).
BESIDE_FAMILIES = ["gemma4_moe"]

# Hyper-connections: the residual is 4 streams (see massact.models.adapters.hyper and tests/test_hyper_connections.py).
HYPER_FAMILIES = ["deepseek_v4", "hy_v4", "qwen4_exp"]


# Gated DeltaNet sizes for the Qwen3-Next / Qwen3.5 hybrids (3 linear-attention blocks, then one gated softmax block).
_LINEAR = dict(head_dim=D_MODEL // N_HEADS, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
               linear_num_value_heads=4)


# The blocks' MLPs of the families that list them: block 0 dense, then experts.
_FIRST_DENSE = ["dense", "sparse", "sparse", "sparse"]
# Mamba-2 sizes (Nemotron-H, Bamba): 4 heads of 32 over the expanded width 2 x 64, one group, state 16, chunks of 16.
_MAMBA2 = dict(ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=1, chunk_size=16)


# DeepSeek's latent attention and routing (4 experts in 2 groups, block 0 dense).
_MLA = dict(num_key_value_heads=N_HEADS, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1)


# DeepSeek sparse attention: an indexer of 2 heads picks each query's 4 best keys.
_DSA = dict(_MLA, index_topk=4, index_head_dim=16, index_n_heads=2)


def tiny_config(family: str, vocab_size: int):
    """A tiny random config of the real transformers class: 4 blocks, d_model 64, d_mlp 256, 4 heads, 64 positions."""
    import transformers as t

    common = dict(vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                  num_attention_heads=N_HEADS, max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    grouped = dict(common, num_key_value_heads=2)
    configs = {
        "gpt2": lambda: t.GPT2Config(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                     n_inner=D_MLP, bos_token_id=0, eos_token_id=1),
        "llama": lambda: t.LlamaConfig(**grouped),
        "mistral": lambda: t.MistralConfig(**grouped),
        "qwen2": lambda: t.Qwen2Config(**grouped),
        "qwen3": lambda: t.Qwen3Config(**grouped, head_dim=D_MODEL // N_HEADS),
        "gemma": lambda: t.GemmaConfig(**grouped, head_dim=D_MODEL // N_HEADS),
        "gemma2": lambda: t.Gemma2Config(**grouped, head_dim=D_MODEL // N_HEADS),
        "gemma3": lambda: t.Gemma3TextConfig(**grouped, head_dim=D_MODEL // N_HEADS),
        "phi": lambda: t.PhiConfig(**common),
        "phi3": lambda: t.Phi3Config(**grouped),
        "neox": lambda: t.GPTNeoXConfig(**common, use_parallel_residual=True),
        "neox-seq": lambda: t.GPTNeoXConfig(**common, use_parallel_residual=False),
        "gptj": lambda: t.GPTJConfig(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                     n_inner=D_MLP, rotary_dim=8, bos_token_id=0, eos_token_id=1),
        "falcon": lambda: t.FalconConfig(vocab_size=vocab_size, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                                         num_attention_heads=N_HEADS, parallel_attn=True, bos_token_id=0, eos_token_id=1),
        "falcon-seq": lambda: t.FalconConfig(vocab_size=vocab_size, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                                             num_attention_heads=N_HEADS, parallel_attn=False, bos_token_id=0, eos_token_id=1),
        "opt": lambda: t.OPTConfig(vocab_size=vocab_size, hidden_size=D_MODEL, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS,
                                   num_attention_heads=N_HEADS, max_position_embeddings=CONTEXT, word_embed_proj_dim=D_MODEL,
                                   do_layer_norm_before=True, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        "opt-postln": lambda: t.OPTConfig(vocab_size=vocab_size, hidden_size=D_MODEL, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS,
                                          num_attention_heads=N_HEADS, max_position_embeddings=CONTEXT, word_embed_proj_dim=D_MODEL,
                                          do_layer_norm_before=False, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        "mixtral": lambda: t.MixtralConfig(**grouped, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**grouped, moe_intermediate_size=D_MLP, shared_expert_intermediate_size=96, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
        "olmo2": lambda: t.Olmo2Config(**grouped),
        "olmo3": lambda: t.Olmo3Config(**grouped, sliding_window=4),
        "exaone4": lambda: t.Exaone4Config(**grouped, sliding_window=4),  # 3 sliding blocks, then one full without positions
        "cohere2": lambda: t.Cohere2Config(**grouped, sliding_window=4),
        "seed_oss": lambda: t.SeedOssConfig(**grouped, head_dim=D_MODEL // N_HEADS),
        "apertus": lambda: t.ApertusConfig(**grouped),
        "smollm3": lambda: t.SmolLM3Config(**grouped),  # block 3 without rotary positions
        "lfm2": lambda: t.Lfm2Config(**grouped, layer_types=["conv", "full_attention", "conv", "full_attention"]),
        "qwen3_next": lambda: t.Qwen3NextConfig(**grouped, **_LINEAR, num_experts=0),
        "qwen3_5": lambda: t.Qwen3_5TextConfig(**grouped, **_LINEAR),
        "gemma3mm": lambda: t.Gemma3Config(
            text_config=dict(grouped, head_dim=D_MODEL // N_HEADS, query_pre_attn_scalar=D_MODEL // N_HEADS),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                               patch_size=8), mm_tokens_per_image=4, boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1),
        # Per-layer inputs of width 8; the full-attention block has heads of 32 (global_head_dim), the sliding ones 16.
        "gemma4": lambda: t.Gemma4TextConfig(**grouped, head_dim=D_MODEL // N_HEADS, global_head_dim=32, sliding_window=4,
                                             layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab_size),
        # The same with 4 routed experts (top-2, width 64) beside the dense MLP in every block.
        "gemma4_moe": lambda: t.Gemma4TextConfig(**grouped, head_dim=D_MODEL // N_HEADS, global_head_dim=32, sliding_window=4,
                                                 layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                                 hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab_size,
                                                 enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64),
        # Granite 3's scales: branches x 0.22, embeddings x 12, attention scores x 1/head_dim, logits / 8.
        "granite": lambda: t.GraniteConfig(**grouped, residual_multiplier=0.22, embedding_multiplier=12.0,
                                           attention_multiplier=1.0 / (D_MODEL // N_HEADS), logits_scaling=8.0),
        "olmo": lambda: t.OlmoConfig(**grouped, clip_qkv=8.0),
        "glm4": lambda: t.Glm4Config(**grouped, head_dim=D_MODEL // N_HEADS),
        "starcoder2": lambda: t.Starcoder2Config(**grouped),
        "internlm3": lambda: t.InternLM3Config(**grouped, head_dim=D_MODEL // N_HEADS),
        "ministral": lambda: t.MinistralConfig(**grouped, head_dim=D_MODEL // N_HEADS, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"] * 2),
        # YaRN over 16 x 4 positions; the queries scaled by 1 + 0.1 log(1 + floor(position / 4)).
        "ministral3": lambda: t.Ministral3Config(**grouped, head_dim=D_MODEL // N_HEADS, rope_parameters=dict(
            rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=CONTEXT // 16, beta_fast=32.0,
            beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.1)),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**grouped, head_dim=D_MODEL // N_HEADS, moe_intermediate_size=D_MLP, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0]),
        "olmoe": lambda: t.OlmoeConfig(**grouped, num_experts=4, num_experts_per_tok=2),
        "gpt_oss": lambda: t.GptOssConfig(**grouped, head_dim=D_MODEL // N_HEADS, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=CONTEXT),  # alternating sliding and full blocks, the window the whole text
        "deepseek_v2": lambda: t.DeepseekV2Config(**common, **_MLA, moe_intermediate_size=D_MLP, topk_method="group_limited_greedy",
                                                  routed_scaling_factor=2.0),
        "deepseek_v3": lambda: t.DeepseekV3Config(**common, **_MLA, moe_intermediate_size=D_MLP, routed_scaling_factor=2.5),
        "deepseek_v32": lambda: t.DeepseekV32Config(**common, **_DSA, moe_intermediate_size=D_MLP, routed_scaling_factor=2.5),
        # Block 2 reuses block 1's selection.
        "glm_moe_dsa": lambda: t.GlmMoeDsaConfig(**common, **_DSA, moe_intermediate_size=D_MLP, routed_scaling_factor=2.5,
                                                 indexer_types=["full", "full", "shared", "full"]),
        "glm4_moe": lambda: t.Glm4MoeConfig(**grouped, head_dim=D_MODEL // N_HEADS, moe_intermediate_size=D_MLP, n_routed_experts=4,
                                            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                            routed_scaling_factor=2.5, attention_bias=True),
        "llama4": lambda: t.Llama4TextConfig(**grouped, head_dim=D_MODEL // N_HEADS, intermediate_size_mlp=D_MLP, num_local_experts=4,
                                             num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=CONTEXT),
        "qwen3_next_moe": lambda: t.Qwen3NextConfig(**grouped, **_LINEAR, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=D_MLP,
                                                    shared_expert_intermediate_size=96, mlp_only_layers=[0]),
        "qwen3_5_moe": lambda: t.Qwen3_5MoeTextConfig(**grouped, **_LINEAR, num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=D_MLP, shared_expert_intermediate_size=96),
        "minimax_m2": lambda: t.MiniMaxM2Config(**grouped, head_dim=D_MODEL // N_HEADS, num_local_experts=4, num_experts_per_tok=2),
        "ernie4_5_moe": lambda: t.Ernie4_5_MoeConfig(**grouped, moe_intermediate_size=D_MLP, num_experts=4, num_experts_per_tok=2,
                                                     moe_num_shared_experts=1, moe_layer_start_index=1),  # block 0 dense
        "exaone_moe": lambda: t.ExaoneMoeConfig(**grouped, head_dim=D_MODEL // N_HEADS, moe_intermediate_size=D_MLP, num_experts=4,
                                                num_experts_per_tok=2, num_shared_experts=1, n_group=2, topk_group=1,
                                                routed_scaling_factor=2.5, sliding_window=4, mlp_layer_types=_FIRST_DENSE),
        # Shared experts averaged with the routed ones (the config's default strategy); block 0 dense.
        "cohere2_moe": lambda: t.Cohere2MoeConfig(**grouped, head_dim=D_MODEL // N_HEADS, num_experts=4, num_experts_per_tok=2,
                                                  num_shared_experts=1, sliding_window=4, sliding_window_pattern=2, first_k_dense_replace=1,
                                                  prefix_dense_intermediate_size=D_MLP),
        "afmoe": lambda: t.AfmoeConfig(**grouped, head_dim=D_MODEL // N_HEADS, moe_intermediate_size=D_MLP, num_experts=4,
                                       num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, route_scale=2.0,
                                       sliding_window=4, global_attn_every_n_layers=2),
        "mimo_v2_flash": lambda: t.MiMoV2FlashConfig(**grouped, head_dim=D_MODEL // N_HEADS, v_head_dim=8, moe_intermediate_size=D_MLP,
                                                     num_local_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                                                     routed_scaling_factor=2.0, sliding_window=4,
                                                     layer_types=["sliding_attention", "full_attention"] * 2),
        "laguna": lambda: t.LagunaConfig(**grouped, head_dim=D_MODEL // N_HEADS, moe_intermediate_size=D_MLP,
                                         shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                         moe_routed_scaling_factor=2.0, moe_router_logit_softcapping=30.0, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"] * 2),
        # 4 streams; DeepSeek-V4: block 0 hash-routed, sliding attention over the whole text, 3 Sinkhorn iterations.
        "deepseek_v4": lambda: t.DeepseekV4Config(
            **common, moe_intermediate_size=D_MLP, head_dim=16, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16,
            n_routed_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention"] * N_LAYERS,
            mlp_layer_types=["hash_moe"] + ["moe"] * (N_LAYERS - 1), sliding_window=CONTEXT, hc_mult=4, hc_sinkhorn_iters=3),
        "hy_v4": lambda: t.HYV4Config(
            **common, moe_intermediate_size=D_MLP, num_key_value_heads=N_HEADS, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            mlp_layer_types=["dense"] + ["sparse"] * (N_LAYERS - 1), layer_types=["indexed_attention"] * N_LAYERS,
            indexer_types=["full", "shared", "full", "shared"], index_topk=CONTEXT, index_head_dim=16, index_n_heads=2, hc_mult=4),
        "qwen4_exp": lambda: t.Qwen4ExpTextConfig(
            **grouped, head_dim=D_MODEL // N_HEADS, **{k: v for k, v in _LINEAR.items() if k != "head_dim"}, moe_intermediate_size=D_MLP,
            shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
            layer_types=["linear_attention"] * 3 + ["indexed_attention"], hc_count=4, hc_lowrank=16, indexer_n_heads=2,
            indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=CONTEXT, indexer_compress_ratio=4),
        # Mamba-2, an MLP block (at the planted block 1), attention, an MLP block.
        "nemotron_h": lambda: t.NemotronHConfig(**{k: v for k, v in grouped.items() if k != "num_hidden_layers"}, **_MAMBA2,
                                                head_dim=D_MODEL // N_HEADS,
                                                layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"]),
        # The default config's pattern: Mamba-2, a mixture of experts (at the planted block 1: 4 ungated experts in 2
        # groups, top-2, and a shared expert), attention, an MLP block.
        "nemotron_h_moe": lambda: t.NemotronHConfig(**{k: v for k, v in grouped.items() if k != "num_hidden_layers"}, **_MAMBA2,
                                                    head_dim=D_MODEL // N_HEADS, n_routed_experts=4, num_experts_per_tok=2,
                                                    n_group=2, topk_group=1, moe_intermediate_size=D_MLP,
                                                    moe_shared_expert_intermediate_size=96,
                                                    layers_block_type=["linear_attention", "moe", "full_attention", "mlp"]),
        # Nemotron-H's expert block with latent experts (a latent of 32, fc1_latent_proj and fc2_latent_proj around the
        # experts) and mlp_bias (biases in those, the shared expert and the dense MLP).
        "nemotron_h_latent": lambda: t.NemotronHConfig(**{k: v for k, v in grouped.items() if k != "num_hidden_layers"}, **_MAMBA2,
                                                       head_dim=D_MODEL // N_HEADS, n_routed_experts=4, num_experts_per_tok=2,
                                                       n_group=2, topk_group=1, moe_intermediate_size=D_MLP,
                                                       moe_shared_expert_intermediate_size=96, moe_latent_size=32, mlp_bias=True,
                                                       layers_block_type=["linear_attention", "moe", "full_attention", "mlp"]),
        "bamba": lambda: t.BambaConfig(**grouped, attn_layer_indices=[2], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
                                       mamba_d_state=16, mamba_chunk_size=16),
        # Granite-4.0-H with a dense MLP only (no experts): Mamba-2, attention without positions, alternating (two scans
        # only: their reference kernel is slow on a CPU); Granite's scales (branches x 0.22, embeddings x 12).
        "granitemoehybrid": lambda: t.GraniteMoeHybridConfig(
            **{k: v for k, v in grouped.items() if k != "intermediate_size"}, shared_intermediate_size=D_MLP, num_local_experts=0,
            layer_types=["linear_attention", "full_attention"] * 2, mamba_n_heads=4,
            mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16, residual_multiplier=0.22,
            embedding_multiplier=12.0, attention_multiplier=1.0 / (D_MODEL // N_HEADS), logits_scaling=8.0),
        # Granite-4.0-H with experts (the config's default kind): 4 experts, top-2, and beside them the shared MLP (96
        # wide), in every block; the same scales and alternating mixers as above.
        "granitemoehybrid_moe": lambda: t.GraniteMoeHybridConfig(
            **grouped, shared_intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"] * 2, mamba_n_heads=4,
            mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16, residual_multiplier=0.22,
            embedding_multiplier=12.0, attention_multiplier=1.0 / (D_MODEL // N_HEADS), logits_scaling=8.0),
        # Falcon-H1: a Mamba-2 scan (4 heads of 32 over 128, state 16) beside the attention in every block, with muP
        # multipliers other than 1 of the sizes the released models have, so that a factor left out shows.
        "falcon_h1": lambda: t.FalconH1Config(
            **grouped, mamba_d_ssm=2 * D_MODEL, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
            mamba_chunk_size=16, embedding_multiplier=4.0, lm_head_multiplier=0.25, mlp_multipliers=[0.75, 0.5],
            key_multiplier=0.5, attention_in_multiplier=0.8, attention_out_multiplier=0.9, ssm_in_multiplier=1.25,
            ssm_out_multiplier=0.25, ssm_multipliers=[0.35, 0.25, 0.35, 0.5, 0.35]),
        # Mamba, attention, Mamba, attention (two scans only: their reference recurrence is slow on a CPU); experts in
        # blocks 0 and 2, dense MLPs in 1 (the planted block) and 3.
        "jamba": lambda: t.JambaConfig(**grouped, attn_layer_period=2, attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                                       expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8),
        # The same mixers, experts in blocks 1 (the planted block) and 3, dense MLPs in 0 and 2.
        "jamba_moe": lambda: t.JambaConfig(**grouped, attn_layer_period=2, attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                                           expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8),
        "olmo_hybrid": lambda: t.OlmoHybridConfig(**grouped, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                                  linear_num_value_heads=4),  # 3 linear-attention blocks, then a softmax one
        "lfm3": lambda: t.Lfm3Config(**grouped, head_dim=D_MODEL // N_HEADS),  # conv, conv, full attention, conv; sandwich norms
        # Kimi Delta Attention and latent attention, alternating (two linear blocks only: their reference kernel is slow on
        # a CPU); 4 experts and a shared one in blocks 0 and 2, dense MLPs in 1 (the planted block) and 3.
        "kimi_linear": lambda: t.KimiLinearConfig(
            **common, num_key_value_heads=N_HEADS, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
            moe_intermediate_size=D_MLP, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1, linear_head_dim=16,
            linear_num_heads=4, layer_types=["linear_attention", "full_attention"] * 2, mlp_layer_types=["sparse", "dense"] * 2),
        # The same mixers, experts in blocks 1 (the planted block) and 3, dense MLPs in 0 and 2.
        "kimi_linear_moe": lambda: t.KimiLinearConfig(
            **common, num_key_value_heads=N_HEADS, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
            moe_intermediate_size=D_MLP, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1, linear_head_dim=16,
            linear_num_heads=4, layer_types=["linear_attention", "full_attention"] * 2, mlp_layer_types=["dense", "sparse"] * 2),
        "bert": lambda: t.BertConfig(**common),
        "roberta": lambda: t.RobertaConfig(**dict(common, max_position_embeddings=CONTEXT + 3)),
    }
    return configs[family]()


def tiny_model(family: str, vocab_size: int, seed: int = 0):
    import transformers as t

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size)
    config._attn_implementation = "eager"
    head = t.AutoModelForMaskedLM if family in ("bert", "roberta") else t.AutoModelForCausalLM
    model = head.from_config(config, attn_implementation="eager").eval()
    if family == "falcon_h1":  # its scan's output starts ~1e-4 of the attention's: made as large, so that both parts count
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mamba.out_proj.weight *= 3000.0
    if family in RANDOM_BIASES:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, 0.02)
    return model


def _isolate_trigger(model, bos: int, adapter=None) -> None:
    """Only BOS carries TRIGGER (value 10 in its token embedding), and no sublayer writes into it, in any block."""
    adapter, config = adapter or adapter_for(model.config), text_config(model)
    for module in model.modules():  # token, position and token-type embeddings alike
        if isinstance(module, torch.nn.Embedding) and module.weight.shape[1] == D_MODEL:
            module.weight[:, TRIGGER] = 0.0
    model.get_input_embeddings().weight[bos, TRIGGER] = 10.0
    for layer in range(config.num_hidden_layers):
        here = adapter.at(config, layer)
        ple = here.per_layer_input
        paths = (*here.mixer_projections, here.mlp_down) + ((ple.projection,) if ple is not None else ())
        for path in (p for p in paths if p is not None):  # a block may be one sublayer
            module = adapter.module(model, layer, path)
            adapter.weight_out_in(module)[TRIGGER] = 0.0
            if getattr(module, "bias", None) is not None:
                module.bias[TRIGGER] = 0.0
        if here.moe is not None:  # the expert blocks of a family planted in a dense block (or beside it): no expert writes it
            _isolate_experts(adapter, model, layer, here.moe)


def _isolate_experts(adapter, model, layer: int, moe) -> None:
    """No expert of block ``layer``'s mixture of experts ``moe`` writes TRIGGER: the routed experts (through their
    latent out-projection where they work in a latent) and the shared expert (in the block or beside it), weights and
    biases."""
    block = adapter.module(model, layer, moe.block)
    experts = block.get_submodule(moe.experts.path)
    writers = [adapter.module(model, layer, moe.shared_part(moe.shared.down))] if moe.shared is not None else []
    if moe.latent is not None:
        writers.append(block.get_submodule(moe.latent[1]))
    else:
        (experts.down_proj[:, :, TRIGGER] if moe.experts.transposed else experts.down_proj[:, TRIGGER]).zero_()
        if moe.experts.biases:
            experts.down_proj_bias[:, TRIGGER] = 0.0
    for linear in writers:
        linear.weight[TRIGGER] = 0.0
        if linear.bias is not None:
            linear.bias[TRIGGER] = 0.0


@torch.no_grad()
def plant_mlp(model, bos: int, layer: int, neuron: int, dim: int, out_weight: float = 100.0, adapter=None) -> None:
    """Neuron ``neuron`` of block ``layer`` fires on BOS only and writes ``out_weight`` x its activation into ``dim``
    (``adapter``: the model's, where no registered adapter claims its type)."""
    adapter = adapter or adapter_for(model.config)
    _isolate_trigger(model, bos, adapter)
    here = adapter.at(text_config(model), layer)  # the planted block's own MLP (a family's blocks may differ)
    for site in ("mlp_up", "mlp_gate") if here.gated else ("mlp_up",):
        w, bias = adapter.input_rows(model, layer, site)
        w[neuron] = 0.0
        w[neuron, TRIGGER] = 2.0
        if bias is not None:
            bias[neuron] = -4.0  # pre-activation 2 x (~8 at BOS) - 4 > 0; 2 x (~0 elsewhere) - 4 < 0
    adapter.weight_out_in(adapter.module(model, layer, here.mlp_down))[dim, neuron] = out_weight


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
    adapter.weight_out_in(adapter.module(model, layer, adapter.attn_proj))[dim, head * head_dim] = 50.0


def weights_hash(model) -> str:
    """A digest of every weight and buffer: equal before and after means an intervention restored the model exactly."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def massact_command(*args) -> list[str]:
    """The command line that runs massact in a fresh interpreter, as a user would."""
    return [sys.executable, "-m", "massact", *map(str, args)]


def run_massact(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(massact_command(*args), capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(result, *fragments: str) -> str:
    """The run failed with exit code 2 and one line on stderr holding every fragment; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("massact: error:") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_planted(path: Path, family: str, tokenizer, layer: int, neuron: int, dim: int) -> Path:
    """A tiny model with a planted MLP neuron, saved with its tokenizer as a model directory the CLI can load."""
    model = tiny_model(family, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, layer, neuron, dim)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The planted Llama that the bad-input, schema and resume tests share: neuron 37 of block 1 writes dim 20.
PLANTED = (1, 37, 20)
TINY = ["--no-verify", "--format", "json", "--quiet"]  # the cheapest scan that writes report.json


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    return save_planted(tmp_path_factory.mktemp("planted") / "llama", "llama", tokenizer, *PLANTED)

