"""Every adapter's renaming checked on a tiny random model of the real transformers class (nnterp-style)."""

import pytest
import torch

from conftest import BESIDE_FAMILIES, D_MODEL, FAMILIES, MOE_FAMILIES, tiny_model
from massact.capture.edits import edit_site, patch_position
from massact.capture.hooks import Trace
from massact.errors import UsageError
from massact.models.adapters import adapter_for
from massact.models.adapters.base import bias_of, text_config
from massact.models.loading import wrap
from massact.sites import SITES, resolve_site

# The norm each family's MLP reads through (None: post-LN, the MLP reads resid_mid as it is), and from which stream.
MLP_NORM = {
    "gpt2": ("ln_2", "resid_mid"), "phi": ("input_layernorm", "resid_in"), "neox": ("post_attention_layernorm", "resid_in"),
    "neox-seq": ("post_attention_layernorm", "resid_mid"), "gptj": ("ln_1", "resid_in"), "falcon": ("input_layernorm", "resid_in"),
    "falcon-seq": ("post_attention_layernorm", "resid_mid"), "opt": ("final_layer_norm", "resid_mid"),
    "gemma2": ("pre_feedforward_layernorm", "resid_mid"), "gemma3": ("pre_feedforward_layernorm", "resid_mid"),
    "opt-postln": (None, "resid_mid"), "bert": (None, "resid_mid"), "roberta": (None, "resid_mid"),
    # Reordered norms: the MLP reads the stream itself.
    "olmo2": (None, "resid_mid"), "olmo3": (None, "resid_mid"), "exaone4": (None, "resid_mid"),
    "cohere2": ("input_layernorm", "resid_in"), "apertus": ("feedforward_layernorm", "resid_mid"),
    "lfm2": ("ffn_norm", "resid_mid"), "gemma3mm": ("pre_feedforward_layernorm", "resid_mid"),
    "gemma4": ("pre_feedforward_layernorm", "resid_mid"), "gemma4_moe": ("pre_feedforward_layernorm", "resid_mid"),
    "nemotron_h": ("norm", "resid_in"), "bamba": ("pre_ff_layernorm", "resid_mid"),
    # Per block where the blocks differ: OLMo-hybrid's linear-attention blocks are pre-norm, its softmax block reordered.
    "olmo_hybrid": [("post_attention_layernorm", "resid_mid")] * 3 + [(None, "resid_mid")], "lfm3": ("ffn_norm", "resid_mid"),
    "jamba": ("pre_ff_layernorm", "resid_mid"), "falcon_h1": ("pre_ff_layernorm", "resid_mid"),
}
# Post-LN blocks: the LayerNorm after the attention sum and the one after the MLP sum.
POST_LN = {"opt-postln": ("self_attn_layer_norm", "final_layer_norm"), "bert": ("attention.output.LayerNorm", "output.LayerNorm"),
           "roberta": ("attention.output.LayerNorm", "output.LayerNorm")}
close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


TEXTS = ["Summer is warm. Winter is cold.", "A good map shows you where you are."]


def _trace_all(family, tokenizer):
    model = tiny_model(family, len(tokenizer), seed=3)
    adapter, config = adapter_for(model.config), text_config(model)
    for layer in range(config.num_hidden_layers):  # a block output scale other than 1, so that the equations show it
        path = adapter.at(config, layer).output_scale
        if path is not None:
            adapter.blocks(model)[layer].get_buffer(path).fill_(0.5 + layer / 4)
    sites = [(layer, site) for layer in range(config.num_hidden_layers) for site in adapter.at(config, layer).sites]
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), Trace(model, adapter, sites) as trace:
        hidden = model(**ids, output_hidden_states=True).hidden_states
    return model, adapter, trace, hidden


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_residual_stream_adds_up(family, tokenizer):
    """The renaming is right when the block's pieces add up to its output, as the family's equations say."""
    model, adapter, trace, hidden = _trace_all(family, tokenizer)
    config = text_config(model)
    n = config.num_hidden_layers
    for layer in range(n):
        t = lambda site, layer=layer: trace[layer, site]
        block = lambda path, layer=layer: adapter.module(model, layer, path)
        here = adapter.at(text_config(model), layer)
        assert t("resid_in").shape == t("resid_out").shape == t("resid_in").shape[:2] + (D_MODEL,)
        if not here.has_mlp or here.mixer is None:  # one sublayer, one residual add: no resid_mid, no site of the other
            branch, missing = ("attn_out", "mlp_out") if here.mixer is not None else ("mlp_out", "attn_out")
            assert missing not in here.sites and "resid_mid" not in here.sites
            close(t("resid_out"), t("resid_in") + t(branch))
        elif family in POST_LN:
            first, last = POST_LN[family]
            close(t("attn_sum"), t("resid_in") + t("attn_out"))
            close(t("resid_mid"), block(first)(t("attn_sum")))
            close(t("resid_sum"), t("resid_mid") + t("mlp_out"))
            close(t("resid_out"), block(last)(t("resid_sum")))
        elif adapter.parallel:
            close(t("resid_out"), t("resid_in") + t("attn_out") + t("mlp_out"))
        else:
            close(t("resid_mid"), t("resid_in") + t("attn_out"))
            ple = here.per_layer_input
            if ple is None:
                close(t("resid_out"), t("resid_mid") + t("mlp_out"))
            else:  # a third writer reads the stream the MLP left, and the sum is scaled by the block's layer scalar
                close(t("ple_in"), t("resid_mid") + t("mlp_out"))
                close(t("ple_out"), block(ple.norm)(t("ple_raw")))
                scale = adapter.scale_of(model, layer)
                assert scale == 0.5 + layer / 4
                close(t("resid_out"), scale * (t("ple_in") + t("ple_out")))
        # Every writer as it lands, summed: what the origin and the trigger split count as the block's branches.
        if not adapter.post_ln:
            landed = sum(t(site) for site in adapter.writers(config, layer))
            close(t("resid_out"), adapter.scale_of(model, layer) * (t("resid_in") + landed))
        for site, norm in here.branch_norms.items():  # what lands is the branch's own norm of the sublayer's raw output
            close(t(site), block(norm)(t(here.raw(site))))
        if here.beside is not None:  # the MLP branch's raw output is the dense part plus the experts' part, each normed
            beside = here.beside
            close(t("dense_out"), block(beside.dense_norm)(t("dense_raw")))
            close(t("moe_out"), block(beside.routed_norm)(t("moe_raw")))
            close(t("moe_in"), block(beside.norm)(t("resid_mid")))
            close(t("mlp_raw"), t("dense_out") + t("moe_out"))
        if here.branch_scale is not None:  # what lands is the sublayer's raw output times the config's scale
            for site in ("attn_out", "mlp_out"):
                close(t(site), getattr(text_config(model), here.branch_scale) * t(here.raw(site)))
        if here.mlp is not None and here.mlp.down_scale is not None:  # Falcon-H1: the down projection's output x down_multiplier
            close(t("mlp_out"), text_config(model).mlp_multipliers[1] * t("mlp_raw"))
        close(t("resid_in"), hidden[layer])  # HF hidden_states[i] is block i's input
        if layer + 1 < n:
            close(t("resid_out"), trace[layer + 1, "resid_in"])
    if adapter.embedding_scale is not None:  # the base model scales the token embeddings before block 0
        ids = tokenizer(TEXTS, return_tensors="pt", padding=True).input_ids
        with torch.no_grad():
            close(hidden[0], model.get_input_embeddings()(ids) * getattr(text_config(model), adapter.embedding_scale))
    if adapter.post_ln:  # no final norm after post-LN blocks: HF's last hidden state is the last block's output
        close(trace[n - 1, "resid_out"], hidden[n])
    else:  # HF's last hidden state is after the final norm; ours is the block's raw output
        assert not torch.allclose(trace[n - 1, "resid_out"], hidden[n])


@pytest.mark.parametrize("family", FAMILIES + BESIDE_FAMILIES)
def test_mlp_sites_recompose(family, tokenizer):
    """mlp_act, the MLP's raw output and its input, recomputed from the weights and the norm, match the hooks."""
    model, adapter, trace, _ = _trace_all(family, tokenizer)
    for layer in range(text_config(model).num_hidden_layers):
        here = adapter.at(text_config(model), layer)
        if not here.has_mlp:  # a block that is its token mixer alone
            assert not any(site.startswith("mlp_") for site in here.sites)
            continue
        if here.moe is not None and here.beside is None:  # a family's expert blocks: the mixture's input and output
            assert {site for site in here.sites if site.startswith("mlp_")} == {"mlp_in", "mlp_out"}
            continue
        t = lambda site, layer=layer: trace[layer, site]
        act_fn = adapter.activation(model, layer)
        up_w, up_b = adapter.input_rows(model, layer, "mlp_up")
        close(t("mlp_up"), t("mlp_in") @ up_w.detach().T + (up_b.detach() if up_b is not None else 0))
        if here.gated:
            gate_w, _ = adapter.input_rows(model, layer, "mlp_gate")
            close(t("mlp_gate"), t("mlp_in") @ gate_w.detach().T)
            close(t("mlp_act"), act_fn(t("mlp_gate")) * t("mlp_up"))
        else:
            close(t("mlp_act"), act_fn(t("mlp_up")))
        down = adapter.module(model, layer, here.mlp_down)
        bias = bias_of(down)
        close(t(here.dense_site), t("mlp_act") @ adapter.weight_out_in(down).detach().T + (bias.detach() if bias is not None else 0))
        expected = MLP_NORM.get(family, ("post_attention_layernorm", "resid_mid"))
        norm, stream = expected[layer] if isinstance(expected, list) else expected
        close(t("mlp_in"), adapter.module(model, layer, norm)(t(stream)) if norm else t(stream))
        found = adapter.mlp_norm_module(model, layer)  # what the trigger decomposition reads through
        assert (found[0] if found else None) == norm
        assert stream == ("resid_mid" if "resid_mid" in here.sites else "resid_in")  # an MLP alone reads the block input
        assert adapter.parallel == (stream == "resid_in" and here.mixer is not None)


def test_a_patched_scaled_branch_lands_as_patched(tokenizer):
    """Granite multiplies each branch by 0.22 before it lands: a vector patched into attn_out (what lands) is what the
    stream receives, and the attention module's own output holds it divided by 0.22."""
    model = tiny_model("granite", len(tokenizer))
    lm = wrap(model, tokenizer)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    vector = torch.arange(D_MODEL, dtype=torch.float32)
    sites = [(1, "resid_in"), (1, "attn_raw"), (1, "attn_out"), (1, "resid_mid")]
    with torch.no_grad(), patch_position(lm, 1, "attn_out", 2, vector), Trace(model, lm.adapter, sites) as trace:
        model(ids)
    close(trace[1, "attn_out"][0, 2], vector)
    close(trace[1, "resid_mid"][0, 2], trace[1, "resid_in"][0, 2] + vector)
    close(trace[1, "attn_raw"][0, 2], vector / 0.22)


def _module_reads(model, paths: dict[str, tuple[str, str]]) -> tuple[dict, list]:
    """Plain forward hooks (no massact reader) on the named modules of every block: {(layer, name): tensor}, where
    ``paths`` maps a name to (module path in the block, "" the block, and "in" or "out"); returns the dict and the
    handles."""
    seen, handles = {}, []
    first = lambda value: (value[0] if isinstance(value, (tuple, list)) else value).clone()
    for layer, block in enumerate(model.model.layers):
        for name, (path, direction) in paths.items():
            module = block.get_submodule(path)
            if direction == "in":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, key=(layer, name): seen.__setitem__(key, first(args or kwargs["hidden_states"])),
                    with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, output, key=(layer, name): seen.__setitem__(key, first(output))))
    return seen, handles


@pytest.mark.parametrize("family, site", [("falcon_h1", "attn_out"), ("granitemoehybrid_moe", "mlp_out")])
def test_a_summed_branch_is_what_lands_and_edits_as_asked(family, site, tokenizer):
    """A branch no module returns is the sum of its parts. Falcon-H1's attn_out (the scan's output x
    ssm_out_multiplier + the attention's x attention_out_multiplier) is what the MLP's norm reads less the block's
    input; Granite-4.0-H's mlp_out ((experts + shared MLP) x residual_multiplier) is the block's output less what the
    MLP's norm reads. Adding a vector to the summed site adds exactly it to the stream."""
    model = tiny_model(family, len(tokenizer), seed=3)
    lm = wrap(model, tokenizer)
    config = text_config(model)
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    if family == "falcon_h1":
        paths = {"mamba": ("mamba", "out"), "attention": ("self_attn", "out"), "mid": ("pre_ff_layernorm", "in")}
    else:
        paths = {"experts": ("block_sparse_moe", "out"), "shared": ("shared_mlp", "out"), "mid": ("post_attention_layernorm", "in")}
    paths["out"] = ("", "out")
    n = config.num_hidden_layers
    seen, handles = _module_reads(model, paths)
    try:
        with torch.no_grad(), Trace(model, lm.adapter, [(layer, site) for layer in range(n)]) as trace:
            hidden = model(**ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(n):
        if family == "falcon_h1":
            close(trace[layer, site], seen[layer, "mid"] - hidden[layer])
            parts = config.ssm_out_multiplier * seen[layer, "mamba"] + config.attention_out_multiplier * seen[layer, "attention"]
            assert config.ssm_out_multiplier != 1.0 and config.attention_out_multiplier != 1.0
            assert seen[layer, "mamba"].abs().max() > 1e-1 * seen[layer, "attention"].abs().max()  # both parts count
        else:
            close(trace[layer, site], seen[layer, "out"] - seen[layer, "mid"])
            parts = config.residual_multiplier * (seen[layer, "experts"] + seen[layer, "shared"])
            assert seen[layer, "shared"].abs().max() > 1e-2 * seen[layer, "experts"].abs().max()  # both parts count
        close(trace[layer, site], parts)

    layer = 1
    delta = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0))
    seen, handles = _module_reads(model, paths)
    try:
        with torch.no_grad(), edit_site(lm, layer, site, lambda value: value + delta), \
                Trace(model, lm.adapter, [(layer, site)]) as edited:
            after = model(**ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    close(edited[layer, site], trace[layer, site] + delta)
    close(after[layer], hidden[layer])  # blocks before it are untouched
    if family == "falcon_h1":  # the stream the MLP reads holds the edited branch
        close(seen[layer, "mid"], hidden[layer] + trace[layer, site] + delta)
    else:  # the block's output, the branch being the last thing added
        close(seen[layer, "out"], hidden[layer + 1] + delta)
    with torch.no_grad():  # and the model is as it was
        close(model(**ids, output_hidden_states=True).hidden_states[-1], hidden[-1])


def test_transformerlens_aliases():
    assert resolve_site("blocks.2.hook_resid_pre", gated=False) == (2, "resid_in")
    assert resolve_site("blocks.2.mlp.hook_pre", gated=False) == (2, "mlp_up")
    assert resolve_site("blocks.2.mlp.hook_pre", gated=True) == (2, "mlp_gate")
    assert resolve_site("blocks.0.mlp.hook_pre_linear", gated=True) == (0, "mlp_up")
    assert resolve_site("blocks.7.mlp.hook_post", gated=True) == (7, "mlp_act")
    assert resolve_site("blocks.7.hook_mlp_out", gated=True) == (7, "mlp_out")
    assert resolve_site("blocks.11.hook_resid_post", gated=True) == (11, "resid_out")
    assert resolve_site("attn_out", gated=True, layer=4) == (4, "attn_out")
    with pytest.raises(UsageError):
        resolve_site("blocks.1.hook_nonsense", gated=True)
    with pytest.raises(UsageError):
        resolve_site("mlp_gate", gated=False, layer=0)


def test_trace_accepts_aliases_and_gives_the_same_tensor(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    adapter = adapter_for(model.config)
    ids = tokenizer("A good map shows you where you are.", return_tensors="pt").input_ids
    with torch.no_grad(), Trace(model, adapter, ["blocks.1.mlp.hook_pre", "blocks.1.hook_resid_post"]) as trace:
        model(ids)
    assert set(trace.values) == {(1, "mlp_gate"), (1, "resid_out")}
    assert trace[1, "mlp_gate"].shape == (1, ids.shape[1], model.config.intermediate_size)
    assert set(SITES) >= set(adapter.sites)


def test_unsupported_architecture_names_the_supported_ones():
    from types import SimpleNamespace

    from transformers import BloomConfig

    with pytest.raises(UsageError,
                       match=r"'bloom' is not supported.*GPT-2 \(gpt2\).*Llama \(llama, mistral, qwen2, qwen3, gemma, seed_oss, smollm3\).*"
                             r"OPT \(opt\).*BERT \(bert, roberta\).*one Adapter in massact/models/adapters/"):
        adapter_for(BloomConfig())
    with pytest.raises(UsageError, match="'opt' config lacks a field"):  # an old or hand-edited config
        adapter_for(SimpleNamespace(model_type="opt"))


def test_experts_beside_the_mlp_are_declared_with_the_norm_of_their_sum(tokenizer):
    """Gemma-4 with ``enable_moe_block`` maps to the adapter whose blocks hold the dense MLP and the experts beside it:
    the MLP's sites are the dense MLP's, mlp_raw and mlp_out the input and output of the norm of the sum, and each part
    has its own sites. A block declaring experts beside its MLP needs that MLP and that norm."""
    from conftest import tiny_config
    from massact.models.adapters import gemma4
    from massact.models.adapters.base import Adapter, Beside, Mlp, Moe

    config = tiny_config("gemma4", len(tokenizer))
    assert adapter_for(config) is gemma4.ADAPTER
    config.enable_moe_block = True
    here = adapter_for(config).at(config, 1)
    assert here.beside is not None and (here.router_site, here.expert_site, here.dense_site) == ("resid_mid", "moe_in", "dense_raw")
    assert here.sites["mlp_in"] == ("mlp", "in") and here.mlp_down == "mlp.down_proj"
    assert here.sites["mlp_raw"] == ("post_feedforward_layernorm", "in") and here.sites["mlp_out"] == ("post_feedforward_layernorm", "out")
    assert (here.sites["dense_raw"], here.sites["moe_raw"]) == (("mlp", "out"), ("experts", "out"))
    assert here.routers(config, 1) == ("router",)
    beside = Moe(block="", beside=Beside(norm="n2", dense_norm="p1", routed_norm="p2"))
    for wrong in (dict(moe=beside), dict(moe=beside, mlp=Mlp())):  # no dense MLP, or no norm of the sum
        with pytest.raises(ValueError, match="beside the MLP"):
            Adapter(family="toy", model_types=("toy",), layers="layers", **wrong)
    with pytest.raises(ValueError, match="not both"):
        Adapter(family="toy", model_types=("toy",), layers="layers", mlp=Mlp(), moe=Moe())


def test_a_granite_4_h_config_maps_its_experts_where_it_has_them(tokenizer):
    """Granite-4.0-H's default config holds 8 experts beside its shared MLP: it maps to the adapter with experts,
    whose mlp_out is the sum of the two modules; a config without experts, to the dense one."""
    import transformers

    from conftest import tiny_config

    default = adapter_for(transformers.GraniteMoeHybridConfig())
    assert default.moe is not None and default.moe.shared_beside and default.mlp is None
    config = tiny_config("granitemoehybrid", len(tokenizer))
    dense = adapter_for(config)
    assert dense.family == default.family == "Granite-4.0-H" and dense.moe is None and dense.mlp is not None
    assert [part.path for part in default.sites["mlp_out"].parts] == ["block_sparse_moe", "shared_mlp"]


def test_a_laguna_config_whose_head_count_varies_by_block_is_one_line(tokenizer):
    """Laguna may give each block its own head count; massact's attention passes take one, so it says so."""
    from conftest import tiny_config

    config = tiny_config("laguna", len(tokenizer))
    assert adapter_for(config).family == "Laguna"
    config.num_attention_heads_per_layer = [4, 4, 8, 4]
    with pytest.raises(UsageError, match=r"2 different head counts \(num_attention_heads_per_layer\).*4 heads in every block"):
        adapter_for(config)


def test_a_block_of_one_sublayer_is_declared_and_has_only_its_sites():
    """A block without an MLP says so (no_mlp), one without a token mixer has mixer None; neither gets a placeholder
    for what it lacks, and a block must keep one sublayer."""
    from massact.models.adapters.base import Adapter, Mlp

    alone = Adapter(family="toy", model_types=("toy",), layers="layers", mixer="ssm", attention="mixer", attention_out="out_proj",
                    no_mlp=True)
    assert alone.sites == {"resid_in": ("", "in"), "attn_out": ("mixer", "out"), "resid_out": ("", "out")}
    assert alone.attn_proj == "mixer.out_proj" and alone.mlp_down is None and not alone.has_mlp
    mlp = Adapter(family="toy", model_types=("toy",), layers="layers", mixer=None, mlp=Mlp(path="mixer", gate=None), mlp_norm=("norm",))
    assert list(mlp.sites) == ["resid_in", "mlp_in", "mlp_up", "mlp_act", "mlp_out", "resid_out"] and mlp.attn_proj is None
    assert mlp.sites["mlp_in"] == ("mixer", "in")
    for wrong, message in [(dict(), "no_mlp"), (dict(no_mlp=True, mlp=Mlp()), "neither mlp nor moe"),
                           (dict(no_mlp=True, mixer=None), "has a token mixer"), (dict(mlp=Mlp(), mixer="mamba"), "none of")]:
        with pytest.raises(ValueError, match=message):
            Adapter(family="toy", model_types=("toy",), layers="layers", **wrong)
