"""How many of transformers' causal-LM model types massact loads: by a hand-written adapter, by an inferred and
checked one, or refused (with the reason).

    .venv/bin/python benchmarks/count_types.py                 # every type; prints the counts and a Markdown table
    .venv/bin/python benchmarks/count_types.py stablelm glm    # only these types

Each type is built tiny from its own config class (2 blocks, d_model 64, 4 heads, 2 key/value heads, vocabulary 512,
a few experts where it has them) with random weights, and handed to ``massact.models.wrap``: a type a registered
adapter claims is mapped by hand; any other is inferred and checked on a padded probe batch. A type whose tiny model
cannot be built or does not run on the probe batch by itself (a config that needs fields beyond these, a class that
needs extra packages) is counted apart, with transformers' own error.
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from collections import Counter

D_MODEL, N_HEADS = 64, 4
# Small sizes under the names transformers' config classes use for them; a class gets those it has (directly or
# through its attribute map), so that no config gains a field, such as an expert count, its type does not have.
SMALL = dict(
    vocab_size=512, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=2, num_attention_heads=N_HEADS,
    num_key_value_heads=2, head_dim=D_MODEL // N_HEADS, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
    pad_token_id=2, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, ffn_hidden_size=128,
    n_positions=128, n_ctx=128, n_inner=128, ffn_dim=128, rotary_dim=8, tie_word_embeddings=False,
    # Latent attention (DeepSeek-V2/V3 and their kin), and the decoder of an encoder-decoder class.
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
    decoder_layers=2, encoder_layers=2, decoder_attention_heads=N_HEADS, encoder_attention_heads=N_HEADS,
    decoder_ffn_dim=128, encoder_ffn_dim=128,
)
# Changes tried in turn where a class refuses the sizes above (None drops the field): a head_dim it derives or has no
# setter for; latent attention, whose key/value heads are the query heads.
RETRIES = ({}, {"head_dim": None}, {"head_dim": None, "num_key_value_heads": N_HEADS})


def build(model_type: str):
    """A tiny random causal LM of ``model_type``, eager attention, that runs on the probe batch by itself."""
    error = None
    for changes in RETRIES:
        try:
            return _build(model_type, {key: value for key, value in {**SMALL, **changes}.items() if value is not None})
        except Exception as failed:  # each config class and model validates its own fields, with its own error kinds
            error = error or failed
    raise error


def _build(model_type: str, sizes: dict):
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from massact.models.inference import probe_inputs

    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    text_default = default.get_text_config() if hasattr(default, "get_text_config") else default
    config = config_class(**{key: value for key, value in sizes.items() if hasattr(default, key)})
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:  # a multimodal class: its language part gets the small sizes too
        for key, value in sizes.items():
            if hasattr(text_default, key):
                setattr(text, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # the tiny model must run on its own before massact maps it
        model(**probe_inputs(model), use_cache=False)
    return model


LIMIT_S = 60  # a type whose tiny model takes longer to build and load (sizes its config ignores) is counted unbuilt


class OutOfTime(BaseException):
    """The type's time is up: a BaseException, so that no handler of the model's own errors takes it."""


def _out_of_time(signum, frame):
    raise OutOfTime(f"over {LIMIT_S} s")


def classify(model_type: str) -> tuple[str, str]:
    """(how the type loads: "by hand", "inferred", "refused" or "not built", the reason or the checks)."""
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(LIMIT_S)
    try:
        return _classify(model_type)
    except OutOfTime as error:
        return "not built", _line(error)
    finally:
        signal.alarm(0)


def _classify(model_type: str) -> tuple[str, str]:
    from massact.errors import UsageError
    from massact.models import wrap
    from massact.models.adapters import claimed

    try:
        model = build(model_type)
    except Exception as error:  # each config class and model validates its own fields, with its own error kinds
        return "not built", _line(error)
    hand = claimed(model.config)
    try:
        lm = wrap(model, tokenizer=None, name=model_type)
    except UsageError as error:
        return "refused", str(error).split("cannot map its blocks: ")[-1].split("does not hold: ")[-1]
    except Exception as error:  # the model's own code failing under the hand-written adapter's hooks
        return "refused", _line(error)
    if hand:
        return "by hand", lm.adapter.family
    shape = lm.adapter.notes or "sequential, a norm in front of each branch"
    experts = [key for key in ("num_experts", "n_routed_experts", "num_local_experts") if getattr(lm.config, key, 0)]
    # A type whose first blocks are dense (first_k_dense_replace) may have only dense blocks when built this small;
    # a checkpoint's expert blocks would be refused.
    dense = f"; the config has {experts[0]}, and these tiny blocks are dense" if experts else ""
    return "inferred", f"{len(lm.inferred)} checks; {shape}{dense}"


def _line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}"


def main(argv: list[str]) -> None:
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    types = argv or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows, start = [], time.perf_counter()
    for model_type in types:
        how, why = classify(model_type)
        rows.append((model_type, how, why))
        print(f"{model_type}: {how} ({why})", file=sys.stderr, flush=True)
    counts = Counter(how for _, how, _ in rows)
    print(f"{len(rows)} causal-LM types in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{counts[how]} {how}" for how in ("by hand", "inferred", "refused", "not built")))
    print("\n| model type | loads | adapter or reason |\n|---|---|---|")
    for model_type, how, why in rows:
        print(f"| `{model_type}` | {how} | {why.replace('|', '/')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
