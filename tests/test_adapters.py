"""Every adapter's renaming checked on a tiny random model of the real transformers class (nnterp-style)."""

import pytest
import torch

from massact.capture.hooks import Trace
from massact.errors import UsageError
from massact.models.adapters import adapter_for
from massact.models.adapters.base import bias_of, weight_out_in
from massact.sites import SITES, resolve_site

from conftest import tiny_model

FAMILIES = ["gpt2", "llama", "mistral", "qwen2"]


def _trace_all(family, tokenizer):
    model = tiny_model(family, len(tokenizer), seed=3)
    adapter = adapter_for(model.config)
    sites = [(layer, site) for layer in range(model.config.num_hidden_layers) for site in adapter.sites]
    ids = tokenizer("Summer is warm. Winter is cold.", return_tensors="pt").input_ids
    with torch.no_grad(), Trace(model, adapter, sites) as trace:
        hidden = model(ids, output_hidden_states=True).hidden_states
    return model, adapter, trace, hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream_adds_up(family, tokenizer):
    model, adapter, trace, hidden = _trace_all(family, tokenizer)
    n = model.config.num_hidden_layers
    for layer in range(n):
        t = lambda site: trace[layer, site]
        torch.testing.assert_close(t("resid_mid"), t("resid_in") + t("attn_out"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t("resid_out"), t("resid_in") + t("attn_out") + t("mlp_out"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t("resid_in"), hidden[layer])  # HF hidden_states[i] is block i's input
        if layer + 1 < n:  # HF's last hidden state is after the final norm; ours is the block's raw output
            torch.testing.assert_close(t("resid_out"), trace[layer + 1, "resid_in"])
            torch.testing.assert_close(t("resid_out"), hidden[layer + 1])
    assert not torch.allclose(trace[n - 1, "resid_out"], hidden[n])


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_sites_recompose(family, tokenizer):
    model, adapter, trace, _ = _trace_all(family, tokenizer)
    for layer in range(model.config.num_hidden_layers):
        act_fn = adapter.module(model, layer, adapter.act_fn)
        if adapter.gated:
            expected_act = act_fn(trace[layer, "mlp_gate"]) * trace[layer, "mlp_up"]
        else:
            expected_act = act_fn(trace[layer, "mlp_up"])
        torch.testing.assert_close(trace[layer, "mlp_act"], expected_act, rtol=1e-5, atol=1e-6)
        down = adapter.module(model, layer, adapter.mlp_down)
        bias = bias_of(down)
        expected_out = trace[layer, "mlp_act"] @ weight_out_in(down).detach().T + (bias.detach() if bias is not None else 0)
        torch.testing.assert_close(trace[layer, "mlp_out"], expected_out, rtol=1e-5, atol=1e-5)
        norm_path = adapter.sites["resid_mid"][0]
        torch.testing.assert_close(trace[layer, "mlp_in"], adapter.module(model, layer, norm_path)(trace[layer, "resid_mid"]))


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
    from transformers import BertConfig

    with pytest.raises(UsageError, match=r"'bert' is not supported.*GPT-2 \(gpt2\).*Llama \(llama, mistral, qwen2\)"):
        adapter_for(BertConfig())
