"""massact's masks in real SAE libraries, on the default model (SmolLM2-135M-Instruct, whose first token carries
about +24,900 in dim 507 from block 11 on). SAELens and EleutherAI's sparsify each train a TopK SAE on block 12's
output for a few steps, once with the positions massact flags left out (by the token ids at the flagged positions,
or by the mask itself) and once without: the rows the library handed its SAE are counted and searched for the
massive value. The masked runs must lose exactly the flagged rows and hold no massive one; the plain runs must
hold them, so that the checks can fail."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import datasets
import pytest
import torch
from transformers.utils import logging as hf_logging

import massact
from massact.texts import DEFAULT_TEXTS

# Importing SAELens imports TransformerLens, which sets transformers' logger to ERROR and adds a warnings filter: both
# are put back, so that the session's other test modules (this one is imported at collection) see what they would.
_verbosity = hf_logging.get_verbosity()
with warnings.catch_warnings():
    from sae_lens import ActivationsStore, LanguageModelSAERunnerConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.load_model import HookedProxyLM
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
hf_logging.set_verbosity(_verbosity)

LAYER, DIM = 12, 507  # block 12's output; the massive dim
CONTEXT = 10  # tokens per training sequence: <|im_start|> and the sentence's first 9 tokens
PROMPTS = 4  # sequences per forward pass (SAELens' store_batch_size_prompts, sparsify's batch_size)
BATCH, STEPS = 32, 3  # SAELens: rows per SAE training step, and steps
TRAIN = [  # not the profile's texts
    "Rivers carry sand to the sea over thousands of years.", "Please pass the salt, and the pepper too.",
    "The committee met on Tuesday; nobody agreed on anything.", "Seven swans swam slowly south past the old mill.",
    "In 1969, two astronauts walked on the Moon.", "The baker sold every loaf before noon on Saturday.",
    "Our train left late, so we missed the start of the play.", "He fixed the bicycle with a spanner and some patience.",
    "Bright lanterns hung along the narrow street all night.", "My sister plants tomatoes and beans every April.",
    "The museum closed early because the heating had failed.", "Two foxes crossed the field just after sunrise.",
]


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
               for m in model.modules())


def global_state(lm) -> tuple:
    """What a library could leave changed behind it: hooks on the model, its gradient flags and mode, torch's
    matmul precision and grad mode."""
    return (hook_count(lm.model), tuple(p.requires_grad for p in lm.model.parameters()), lm.model.training,
            torch.get_float32_matmul_precision(), torch.is_grad_enabled())


@pytest.fixture(scope="module")
def smol():
    lm = massact.load(None, device="cpu", log=lambda message: None)
    with torch.no_grad():  # transformers installs its own output-capturing hooks on the first output_hidden_states
        lm.model(torch.tensor([[lm.tokenizer.bos_token_id]]), output_hidden_states=True, use_cache=False)
    before = global_state(lm)
    yield lm
    assert global_state(lm) == before


@pytest.fixture(autouse=True)
def leaves_no_state(smol):
    before = global_state(smol)
    yield
    assert global_state(smol) == before, "a test left hooks, gradient flags or torch settings changed"


@pytest.fixture(scope="module")
def profile(smol):
    return massact.profile(smol, list(DEFAULT_TEXTS))


@pytest.fixture(scope="module")
def threshold(profile):
    block = profile.blocks[LAYER]
    assert DIM in block.dims and [(r.kind, r.position) for r in block.rules] == [("position", 0)]
    return block.threshold  # about 2,150: |a| >= this is massive at block 12


@pytest.fixture(scope="module")
def rows(smol):
    """[12, CONTEXT] token ids, each sequence opened by <|im_start|> (the tokenizer's bos, as a chat would be)."""
    tokenizer = smol.tokenizer
    return torch.tensor([[tokenizer.bos_token_id] + tokenizer(text).input_ids[:CONTEXT - 1] for text in TRAIN])


@pytest.fixture(scope="module")
def hidden(smol, rows):
    """Block 12's output for every sequence, computed independently of the libraries."""
    with torch.no_grad():
        return smol.model(rows, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]


@contextmanager
def library_run(lm):
    """Undo what the libraries change on their way: sparsify's Trainer freezes the model and sets torch's float32
    matmul precision; SAELens' HookedProxyLM hooks the model's modules for good. Seeds the run without touching the
    global RNG."""
    flags = [p.requires_grad for p in lm.model.parameters()]
    precision = torch.get_float32_matmul_precision()
    hooks = {id(m): set(m._forward_hooks) for m in lm.model.modules()}
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            torch.manual_seed(0)
            # SAELens compares a dataset's rows to its training tokens; a few rows train for a few steps here.
            warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
            yield
    finally:
        for module in lm.model.modules():
            for key in set(module._forward_hooks) - hooks[id(module)]:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        for parameter, flag in zip(lm.model.parameters(), flags):
            parameter.requires_grad_(flag)
        torch.set_float32_matmul_precision(precision)


# --- SAELens ------------------------------------------------------------------------------------------------------


class MaskedStore(ActivationsStore):
    """An ActivationsStore that leaves out the positions massact's profile flags at the hooked block."""

    profile: massact.Profile
    layer: int

    def get_filtered_llm_batch(self, raise_on_epoch_end: bool = False) -> torch.Tensor:
        tokens = self.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        acts = self.get_activations(tokens).to(self.device)  # [batch, positions after seqpos_slice, d_in]
        flagged = self.profile.mask(tokens, layer=self.layer)[:, slice(*self.seqpos_slice)].to(acts.device)
        return acts[~flagged]


def recording(store_class):
    """``store_class`` that keeps each forward pass's tokens and the rows it handed on."""

    class Recording(store_class):
        def get_batch_tokens(self, *args, **kwargs):
            tokens = super().get_batch_tokens(*args, **kwargs)
            self.tokens.append(tokens)
            return tokens

        def get_filtered_llm_batch(self, raise_on_epoch_end: bool = False) -> torch.Tensor:
            acts = super().get_filtered_llm_batch(raise_on_epoch_end)
            self.handed.append(acts)
            return acts

    return Recording


class Received:
    """The data provider the SAETrainer reads: the store, with each batch it gave the trainer kept."""

    def __init__(self, store):
        self.store, self.batches = store, []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.store)
        self.batches.append(batch)
        return batch


def train_saelens(lm, rows, store_class=ActivationsStore, exclude=False, profile=None):
    """A few SAETrainer steps of a TopK SAE on block 12 through SAELens' own ActivationsStore pipeline; returns the
    store (its tokens and handed rows) and the batches the trainer received."""
    hook = f"model.layers.{LAYER}"
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=lm.config.hidden_size, d_sae=2 * lm.config.hidden_size, k=16),
        model_name=lm.name, model_class_name="AutoModelForCausalLM", hook_name=hook,
        is_dataset_tokenized=True, streaming=False, context_size=CONTEXT, exclude_special_tokens=exclude,
        training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH, store_batch_size_prompts=PROMPTS,
        n_batches_in_buffer=4, activations_mixing_fraction=0.0,  # no shuffling: the trainer gets the rows in order
        lr=1e-3, device="cpu", logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None,
        verbose=False)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    with library_run(lm):
        model = HookedProxyLM(lm.model, lm.tokenizer, hook_names=[hook])
        store = recording(store_class).from_config(model, cfg, override_dataset=dataset)
        store.tokens, store.handed, store.profile, store.layer = [], [], profile, LAYER
        received = Received(store)
        sae = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=TopKTrainingSAE(cfg.sae), data_provider=received).fit()
    assert torch.isfinite(sae.W_dec).all() and len(received.batches) == STEPS
    return store, torch.cat(received.batches)


def massive_rows(acts: torch.Tensor, threshold: float) -> int:
    return int((acts[:, DIM].abs() >= threshold).sum())


def test_saelens_store_drops_the_profiles_positions(smol, profile, threshold, rows, hidden):
    store, received = train_saelens(smol, rows, MaskedStore, profile=profile)
    handed = torch.cat(store.handed)
    for tokens, acts in zip(store.tokens, store.handed):
        # Each forward pass: PROMPTS x CONTEXT real tokens, the profile flags one per sequence (its first).
        assert int(profile.mask(tokens, layer=LAYER).sum()) == PROMPTS
        assert acts.shape == (PROMPTS * CONTEXT - PROMPTS, smol.config.hidden_size)
    # The store's rows are block 12's output at every position but the first, sequence by sequence.
    assert torch.allclose(handed, hidden[:len(handed) // (CONTEXT - 1), 1:].reshape(-1, hidden.shape[-1]), rtol=1e-4, atol=1e-2)
    # The trainer got exactly those rows, in order, and none of them is massive.
    assert len(received) == STEPS * BATCH and torch.equal(received, handed[:len(received)])
    assert massive_rows(received, threshold) == 0 and received[:, DIM].abs().max() < threshold / 10


def test_saelens_exclude_special_tokens_from_the_flagged_ids(smol, profile, threshold, rows):
    flagged = profile.mask(rows, layer=LAYER)
    exclude = rows[flagged].unique().tolist()
    assert exclude == [smol.tokenizer.bos_token_id]
    # On these sequences the id stands for the position: excluding it drops the flagged positions and nothing else.
    assert torch.equal(torch.isin(rows, torch.tensor(exclude)), flagged)
    store, received = train_saelens(smol, rows, exclude=exclude)
    assert all(len(acts) == PROMPTS * (CONTEXT - 1) for acts in store.handed)
    assert len(received) == STEPS * BATCH and massive_rows(received, threshold) == 0


def test_saelens_without_the_mask_trains_on_the_massive_rows(smol, threshold, rows):
    store, received = train_saelens(smol, rows)
    assert all(len(acts) == PROMPTS * CONTEXT for acts in store.handed)
    # In order, unshuffled: rows 0, 10, 20, ... are the sequences' first tokens, 10 of them in the first 96 rows.
    assert massive_rows(received, threshold) == -(-STEPS * BATCH // CONTEXT)
    assert received[::CONTEXT, DIM].min() > 10 * threshold  # about +24,900


# --- EleutherAI sparsify ------------------------------------------------------------------------------------------


def train_sparsify(lm, rows, exclude, tmp_path):
    """sparsify's own Trainer on block 12 (batches of PROMPTS sequences, its exclude_tokens); returns each batch's
    rows as its SparseCoder received them, and the coder."""
    hookpoint = f"layers.{LAYER}"
    cfg = TrainConfig(SparseCoderConfig(k=16, num_latents=2 * lm.config.hidden_size), batch_size=PROMPTS,
                      hookpoints=[hookpoint], exclude_tokens=exclude, loss_fn="fvu", optimizer="signum", lr=1e-3,
                      log_to_wandb=False, save_dir=str(tmp_path), run_name="run", save_every=10**6)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    received = []
    with library_run(lm):
        trainer = Trainer(cfg, dataset, lm.model)
        coder = trainer.saes[hookpoint]
        handle = coder.register_forward_pre_hook(lambda module, args, kwargs: received.append(kwargs["x"].detach().clone()),
                                                 with_kwargs=True)
        try:
            trainer.fit()
        finally:
            handle.remove()
    assert len(received) == len(rows) // PROMPTS and (tmp_path / "run" / hookpoint / "sae.safetensors").exists()
    return received, coder


def test_sparsify_exclude_tokens_from_the_flagged_ids(smol, profile, threshold, rows, tmp_path):
    exclude = rows[profile.mask(rows, layer=LAYER)].unique().tolist()
    received, coder = train_sparsify(smol, rows, exclude, tmp_path)
    assert [len(x) for x in received] == [PROMPTS * (CONTEXT - 1)] * 3
    assert all(massive_rows(x, threshold) == 0 for x in received)
    # sparsify starts the decoder bias at the first batch's mean: without the massive rows, dim 507's is ordinary.
    assert abs(float(coder.b_dec[DIM].detach()) - float(received[0][:, DIM].mean())) < 0.1
    assert abs(float(coder.b_dec[DIM].detach())) < threshold / 10


def test_sparsify_without_exclusion_trains_on_the_massive_rows(smol, threshold, rows, tmp_path):
    received, coder = train_sparsify(smol, rows, [], tmp_path)
    assert [len(x) for x in received] == [PROMPTS * CONTEXT] * 3
    assert all(massive_rows(x, threshold) == PROMPTS for x in received)
    # The first tokens' +24,900, averaged into the decoder bias.
    assert abs(float(coder.b_dec[DIM].detach()) - float(received[0][:, DIM].mean())) < 0.1
    assert float(coder.b_dec[DIM].detach()) > threshold / 10


def test_sparsify_coder_on_rows_the_live_mask_keeps(smol, profile, threshold):
    """A hand loop over SparseCoder on a padded batch, masked by massact.masks.Hook during the model's own pass."""
    batch = smol.tokenizer(TRAIN[:6], return_tensors="pt", padding=True, padding_side="right")
    real = batch.attention_mask.bool()
    with massact.masks.Hook(smol, layers=[LAYER]) as hook, torch.no_grad():
        hidden = smol.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]
    live = hook.masks[LAYER]
    assert torch.equal(live, profile.mask(batch.input_ids, layer=LAYER, attention_mask=batch.attention_mask))
    assert int(live.sum()) == 6 and not (live & ~real).any()

    def train(rows: torch.Tensor) -> SparseCoder:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            coder = SparseCoder(rows.shape[-1], SparseCoderConfig(k=16, num_latents=2 * rows.shape[-1]), device="cpu")
        optimizer = torch.optim.Adam(coder.parameters(), lr=1e-3)
        coder.b_dec.data = rows.mean(0)
        for chunk in rows.split(16):
            coder.set_decoder_norm_to_unit_norm()
            coder(chunk).fvu.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad()
        return coder

    kept, everything = hidden[real & ~live], hidden[real]
    assert len(kept) == int(real.sum()) - 6 and massive_rows(kept, threshold) == 0
    assert massive_rows(everything, threshold) == 6
    masked, plain = train(kept), train(everything)
    assert abs(float(masked.b_dec[DIM].detach())) < threshold / 10 < float(plain.b_dec[DIM].detach())
