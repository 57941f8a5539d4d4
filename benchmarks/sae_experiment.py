"""Does masking massive activations help a sparse autoencoder? A TopK SAE on the default model's residual stream,
trained three ways on the same number of tokens, all offline on this CPU.

    nice -n 10 .venv/bin/python benchmarks/sae_experiment.py --live-way --out /tmp/sae_experiment

Model: SmolLM2-135M-Instruct (massact's default; 30 blocks, width 576). It carries dim 507 at about +24,000 on each
sequence's first token from block 11 on. Activations: the output of block ``--block`` (a forward hook on
``model.model.layers[block]``, output[0]), cached once for ``--cache-tokens`` tokens in windows of ``--seq-len``
tokens that each start fresh (nothing is prepended unless ``--prepend-bos``: SmolLM2's tokenizer adds no BOS, so a
window's first token is an ordinary word). Text: the Python documentation every CPython ships
(``pydoc_data.topics``), shuffled windows; the last ``--heldout-seqs`` windows are held out. The massact profile is
built on other text (massact's eval.txt, about 2,000 tokens).

The three ways, each ``--tokens`` tokens actually trained on (``--batch`` per step, the same seed and initial
weights; each draws epochs of its own pool in a seeded order):
  (a) none     every token
  (b) special  SAELens-style: tokens whose id is a special id dropped (what sae_lens.util.get_special_token_ids
               gives: the tokenizer's *_token_id attributes and its special_tokens_map, computed here without sae_lens)
  (c) massact  positions where ``Profile.mask(input_ids, layer=block)`` is True dropped (rules only, no forward pass)
  (d) live     with ``--live-way`` only, a reference: every token ``massact.masks.live`` flags dropped (the exact mask)
Ground truth for "massive" is ``massact.masks.live`` at that block, recorded with ``massact.masks.Hook`` during the
caching pass; the script reports how well ``Profile.mask`` (and the special-id rule) agreed with it on the training
tokens.

SAE (plain torch, below): encoder W_enc [d, m], b_enc; decoder W_dec [m, d] with unit-norm rows (renormalised after
every step, the gradient's component along each row removed before it), b_dec initialised at the geometric median of
the way's own training pool; pre = (x - b_dec) W_enc + b_enc, z = ReLU(TopK(pre, k)), x_hat = z W_dec + b_dec; loss =
MSE summed over the d dims, mean over the batch; Adam; no auxiliary loss (dead features are what is measured).

Reported per way:
  FVE    1 - sum||x - x_hat||^2 / sum||x - mean||^2 on the held-out windows: over the held-out tokens that are not
         massive (live mask; the same set for every way) and, separately, over all held-out tokens; and the relative
         error ||x - x_hat|| / ||x|| on the held-out massive tokens
  dead   fraction of features that did not fire on any of the last ``--dead-window`` training tokens, at 25% of
         training and at the end
  L0     k (TopK), and the mean count of nonzero latents after the ReLU on the held-out non-massive tokens
  spikes steps (after the first 50) whose loss > 3 x the median loss of the previous 50 steps, and how many of
         them had a live-massive token in the batch; the largest such ratio; and max / median of the loss over the
         second half of training
  time   seconds of SAE training
plus gamma = ||mean|| / ||std|| (std per dim, population; Simon et al. 2026's outlier severity) of each way's
training activations, and of the training activations with and without the live-massive tokens.

Writes OUT/results.md, OUT/results.json and OUT/loss_curves.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

WAYS = {"a": "none", "b": "special ids (SAELens)", "c": "massact Profile.mask", "d": "masks.live (exact)"}


# --------------------------------------------------------------------------------------------------------------- data

def special_token_ids(tokenizer) -> list[int]:
    """What sae_lens.util.get_special_token_ids returns: every ``*_token_id`` attribute that is set, and the id of
    each token in ``special_tokens_map`` (lists included). The attributes are named explicitly as well as found by
    dir(), since recent transformers resolve them dynamically."""
    ids = set()
    names = {a for a in dir(tokenizer) if a.endswith("_token_id")} | {"bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"}
    for name in names:
        try:
            value = getattr(tokenizer, name)
        except Exception:  # an attribute that cannot be read is not a special id
            continue
        if isinstance(value, int):
            ids.add(value)
    for token in getattr(tokenizer, "special_tokens_map", {}).values():
        for t in token if isinstance(token, list) else [token]:
            if isinstance(t, str):
                value = tokenizer.convert_tokens_to_ids(t)
                if isinstance(value, int):
                    ids.add(value)
    return sorted(ids)


def training_windows(tokenizer, seq_len: int, count: int, seed: int, prepend_bos: bool) -> torch.Tensor:
    """``count`` windows [count, seq_len] of the Python documentation, in a seeded random order; each is scanned as a
    sequence of its own (with ``prepend_bos``, the tokenizer's BOS then seq_len - 1 text tokens)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    step = seq_len - 1 if prepend_bos else seq_len
    chunks = [ids[start:start + step] for start in range(0, len(ids) - step + 1, step)]
    random.Random(seed).shuffle(chunks)
    if len(chunks) < count:
        raise SystemExit(f"the documentation has {len(chunks)} windows of {seq_len} tokens; asked for {count}")
    if prepend_bos:
        chunks = [[tokenizer.bos_token_id, *chunk] for chunk in chunks]
    return torch.tensor(chunks[:count])


def profile_texts() -> list[str]:
    """Text for the massact profile, disjoint from the SAE's: the paragraphs of massact's eval.txt (the Declaration
    of Independence and the Gettysburg Address, about 2,000 tokens)."""
    from importlib.resources import files

    return [p.strip() for p in files("massact.data").joinpath("eval.txt").read_text().split("\n\n") if p.strip()]


class _Stop(Exception):
    pass


@torch.no_grad()
def cache_activations(lm, windows: torch.Tensor, block: int, batch: int, profile, special: list[int]) -> dict:
    """One forward pass per batch of windows, stopped after ``block``: its output (float32), the live mask (from
    massact.masks.Hook), Profile.mask's prediction and the special-id mask."""
    import massact

    acts, live, predicted = [], [], []
    captured = {}

    def grab(module, args, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output).detach().float().clone()
        raise _Stop

    started = time.perf_counter()
    with massact.masks.Hook(lm, layers=[block]) as hook:
        handle = lm.model.model.layers[block].register_forward_hook(grab)  # after the Hook's, so that it runs first
        try:
            for first in range(0, len(windows), batch):
                ids = windows[first:first + batch]
                attention = torch.ones_like(ids)
                try:
                    lm.model(input_ids=ids, attention_mask=attention, use_cache=False)
                except _Stop:
                    pass
                acts.append(captured.pop("h"))
                live.append(hook.masks[block].cpu())
                predicted.append(profile.mask(ids, layer=block, attention_mask=attention))
                done = first + len(ids)
                if done % (batch * 8) == 0 or done == len(windows):
                    rate = done * windows.shape[1] / (time.perf_counter() - started)
                    print(f"  cached {done * windows.shape[1]:>7,} tokens ({rate:,.0f} tokens/s)", flush=True)
        finally:
            handle.remove()
    return {"acts": torch.cat(acts), "live": torch.cat(live), "predicted": torch.cat(predicted),
            "special": torch.isin(windows, torch.tensor(special)), "ids": windows,
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------------------- SAE

class TopKSAE(torch.nn.Module):
    def __init__(self, d: int, m: int, k: int, b_dec: torch.Tensor):
        super().__init__()
        W_dec = torch.randn(m, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(m))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z @ self.W_dec + self.b_dec, z

    @torch.no_grad()
    def project_grad(self) -> None:
        """Remove the gradient's component along each decoder row (the rows stay on the unit sphere)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def geometric_median(x: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    guess = x.median(0).values
    for _ in range(iterations):
        weights = 1 / (x - guess).norm(dim=1).clamp(min=1e-6)
        guess = (weights[:, None] * x).sum(0) / weights.sum()
    return guess


def train(pool: torch.Tensor, massive: torch.Tensor, args, d: int) -> dict:
    """A TopK SAE trained on exactly args.tokens tokens of ``pool`` [n, d]: epochs of seeded permutations.
    ``massive`` [n]: which pool tokens are live-massive (counted per batch, not used in training)."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    sample = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed + 1))[:4096]]
    sae = TopKSAE(d, d * args.expansion, args.k, geometric_median(sample))
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    steps = args.tokens // args.batch
    m = d * args.expansion
    last_fired = torch.zeros(m, dtype=torch.long)  # tokens trained on when each feature last fired (0: never)
    dead_at, losses, batch_massive, order = {}, [], [], torch.empty(0, dtype=torch.long)
    checkpoints = {"25%": steps // 4, "50%": steps // 2, "end": steps}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < args.batch:
            order = torch.cat([order, torch.randperm(len(pool), generator=generator)])
        x, batch_massive_now, order = pool[order[:args.batch]], int(massive[order[:args.batch]].sum()), order[args.batch:]
        x_hat, z = sae(x)
        loss = (x - x_hat).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_grad()
        optimizer.step()
        sae.normalize()
        losses.append(loss.item())
        batch_massive.append(batch_massive_now)
        seen = step * args.batch
        last_fired[(z > 0).any(0)] = seen
        for name, at in checkpoints.items():
            if step == at:
                window = min(args.dead_window, seen)
                dead_at[name] = {"tokens": seen, "window": window,
                                 "fraction": ((seen - last_fired) >= window).float().mean().item()}
        if step % max(1, steps // 10) == 0:
            print(f"    step {step:>5}/{steps}  loss {loss.item():>12,.1f}  {time.perf_counter() - started:6.1f}s", flush=True)
    return {"sae": sae, "losses": losses, "batch_massive": batch_massive, "dead": dead_at,
            "seconds": time.perf_counter() - started, "steps": steps}


def spikes(losses: list[float], batch_massive: list[int], window: int = 50, factor: float = 3.0) -> dict:
    t = torch.tensor(losses)
    ratios = {i: losses[i] / t[i - window:i].median().item() for i in range(window, len(losses))}
    spiked = [i for i, r in ratios.items() if r > factor]
    after, half = t[window:], t[len(t) // 2:]
    return {"count": len(spiked), "with_massive_in_batch": sum(batch_massive[i] > 0 for i in spiked),
            "steps_with_massive_in_batch": sum(n > 0 for n in batch_massive[window:]), "steps": len(ratios),
            "max_running_ratio": max(ratios.values(), default=float("nan")),
            "max_over_median_second_half": (half.max() / half.median()).item(),
            "max_over_median_after_50": (after.max() / after.median()).item() if len(after) else float("nan")}


@torch.no_grad()
def evaluate(sae: TopKSAE, x: torch.Tensor, massive: torch.Tensor) -> dict:
    x_hat, z = sae(x)
    error = (x - x_hat).pow(2).sum(-1)

    def fve(rows):
        xs = x[rows]
        return 1 - (error[rows].sum() / (xs - xs.mean(0)).pow(2).sum()).item()

    normal = ~massive
    relative = (error[massive].sqrt() / x[massive].norm(dim=-1)).mean().item() if massive.any() else float("nan")
    return {"fve_nonmassive": fve(normal), "fve_all": fve(torch.ones_like(massive)), "massive_rel_error": relative,
            "l0_nonzero": (z[normal] > 0).sum(-1).float().mean().item()}


def gamma(x: torch.Tensor) -> float:
    """||mean|| / ||std||, std per dim (population)."""
    return (x.mean(0).norm() / x.std(0, unbiased=False).norm()).item()


def agreement(predicted: torch.Tensor, truth: torch.Tensor) -> dict:
    tp = (predicted & truth).sum().item()
    fp = (predicted & ~truth).sum().item()
    fn = (~predicted & truth).sum().item()
    total = truth.numel()
    return {"flagged": tp + fp, "massive": tp + fn, "true_pos": tp, "false_pos": fp, "false_neg": fn,
            "precision": tp / (tp + fp) if tp + fp else float("nan"), "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "agreement": 1 - (fp + fn) / total}


# --------------------------------------------------------------------------------------------------------------- main

def machine() -> dict:
    def run(*command):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    return {"nproc": run("nproc"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": run("cat", "/proc/loadavg"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512_000, help="tokens each SAE is trained on (default 512,000)")
    parser.add_argument("--block", type=int, default=15, help="block whose output is read (default 15; birth block 11)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sae_experiment"))
    parser.add_argument("--cache-tokens", type=int, default=65_536, help="tokens run through the model (default 65,536)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--heldout-seqs", type=int, default=64, help="windows held out for evaluation (default 64)")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dead-window", type=int, default=102_400, help="tokens a feature must stay silent to be dead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepend-bos", action="store_true", help="start each window with the tokenizer's BOS")
    parser.add_argument("--live-way", action="store_true", help="also train way (d): drop what masks.live flags")
    parser.add_argument("--cache", type=Path, help="a .pt file: load the cached activations from it, or save them there")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    conditions = machine()
    total_started = time.perf_counter()

    import massact

    lm = massact.load(None, device="cpu", log=lambda message: None)
    special = special_token_ids(lm.tokenizer)
    print(f"model {lm.name}; special ids {special} "
          f"({', '.join(repr(lm.tokenizer.convert_ids_to_tokens(i)) for i in special)})", flush=True)

    started = time.perf_counter()
    texts = profile_texts()
    profile = massact.profile(lm, texts, max_length=args.seq_len, batch_size=8)
    profile_seconds = time.perf_counter() - started
    print(f"profile on {profile.tokens:,} tokens of other text in {profile_seconds:.0f}s", flush=True)
    print(profile, flush=True)
    rules = [{"kind": r.kind, "position": r.position, "token_id": r.token_id, "token": r.token} for r in profile.blocks[args.block].rules]

    seqs = args.cache_tokens // args.seq_len
    if args.cache and args.cache.exists():
        cache = torch.load(args.cache)
        print(f"activations loaded from {args.cache}", flush=True)
    else:
        windows = training_windows(lm.tokenizer, args.seq_len, seqs, args.seed, args.prepend_bos)
        print(f"caching block {args.block}'s output on {windows.numel():,} tokens ({seqs} windows of {args.seq_len})", flush=True)
        cache = cache_activations(lm, windows, args.block, 8, profile, special)
        if args.cache:
            torch.save(cache, args.cache)
    cache_seconds = cache["seconds"]
    d = cache["acts"].shape[-1]

    train_seqs = slice(0, seqs - args.heldout_seqs)
    held_seqs = slice(seqs - args.heldout_seqs, seqs)
    flat = lambda t, s: t[s].reshape(-1, *t.shape[2:])
    x_train, live_train = flat(cache["acts"], train_seqs), flat(cache["live"], train_seqs)
    pred_train, special_train = flat(cache["predicted"], train_seqs), flat(cache["special"], train_seqs)
    x_held, live_held = flat(cache["acts"], held_seqs), flat(cache["live"], held_seqs)

    positions = torch.arange(args.seq_len).repeat(seqs - args.heldout_seqs)
    live_positions = sorted(set(positions[live_train].tolist()))
    agree = {"profile_mask": agreement(pred_train, live_train), "special_ids": agreement(special_train, live_train)}
    severity = {"all": gamma(x_train), "without_massive": gamma(x_train[~live_train])}
    missed = []
    for index in (live_train & ~pred_train).nonzero().flatten().tolist():
        window, position = divmod(index, args.seq_len)
        ids = cache["ids"][window].tolist()
        peak = x_train[index].abs().max(0)
        missed.append({"window": window, "position": position, "token": lm.tokenizer.decode(ids[position:position + 1]),
                       "before": lm.tokenizer.decode(ids[max(0, position - 3):position]), "dim": int(peak.indices),
                       "value": float(x_train[index, peak.indices])})
    print(f"training tokens {len(x_train):,}: live-massive {int(live_train.sum()):,} at positions "
          f"{live_positions[:10]}{'...' if len(live_positions) > 10 else ''}; held-out {len(x_held):,} "
          f"({int(live_held.sum())} massive)", flush=True)

    for miss in missed:
        print(f"  missed by Profile.mask: window {miss['window']} position {miss['position']} {miss['token']!r} after "
              f"{miss['before']!r}: dim {miss['dim']} = {miss['value']:,.0f}", flush=True)
    keep = {"a": torch.ones_like(live_train), "b": ~special_train, "c": ~pred_train}
    if args.live_way:
        keep["d"] = ~live_train
    results = {}
    for way, kept in keep.items():
        pool = x_train[kept]
        print(f"({way}) {WAYS[way]}: pool {len(pool):,} tokens ({int((~kept).sum()):,} dropped; "
              f"{int((live_train & kept).sum()):,} live-massive left)", flush=True)
        same_as = next((w for w in results if torch.equal(keep[w], kept)), None)
        if same_as is not None:  # the same pool, seed and order: the run would repeat that one bit for bit
            print(f"    same pool as ({same_as}): its run is reused", flush=True)
            results[way] = dict(results[same_as], same_as=same_as, dropped=int((~kept).sum()))
            continue
        trained = train(pool, live_train[kept], args, d)
        results[way] = {"dropped": int((~kept).sum()), "massive_left": int((live_train & kept).sum()), "gamma": gamma(pool),
                        **evaluate(trained["sae"], x_held, live_held), "dead": trained["dead"],
                        "spikes": spikes(trained["losses"], trained["batch_massive"]), "seconds": trained["seconds"],
                        "steps": trained["steps"],
                        "losses": trained["losses"]}

    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v not in (None, False)]
    report = {"command": "benchmarks/sae_experiment.py " + " ".join(flags),
              "machine": conditions, "model": lm.name, "block": args.block, "d": d, "m": d * args.expansion, "k": args.k,
              "batch": args.batch, "lr": args.lr, "tokens_per_sae": args.tokens // args.batch * args.batch,
              "cached_tokens": seqs * args.seq_len, "training_tokens_unique": len(x_train), "heldout_tokens": len(x_held),
              "heldout_massive": int(live_held.sum()), "train_massive": int(live_train.sum()), "massive_positions": live_positions,
              "special_ids": special, "profile": {"tokens": profile.tokens, "windows": profile.windows, "rules_at_block": rules,
                                                  "seconds": profile_seconds},
              "mask_agreement": agree, "missed_by_profile_mask": missed, "gamma": severity, "cache_seconds": cache_seconds,
              "total_seconds": time.perf_counter() - total_started, "ways": results}
    markdown = table(report)
    print("\n" + markdown, flush=True)
    (args.out / "results.md").write_text(markdown + "\n")
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(results, args.out / "loss_curves.png")
    print(f"wrote {args.out}/results.md, results.json, loss_curves.png; total {report['total_seconds']:.0f}s", flush=True)


def table(r: dict) -> str:
    lines = [f"TopK SAE on {r['model']} block {r['block']} output (d {r['d']}, m {r['m']}, k {r['k']}, batch {r['batch']}, "
             f"Adam lr {r['lr']:g}); {r['tokens_per_sae']:,} training tokens per SAE from {r['training_tokens_unique']:,} "
             f"cached ({r['train_massive']} live-massive, at positions {r['massive_positions']}); held-out "
             f"{r['heldout_tokens']:,} tokens ({r['heldout_massive']} massive). {r['machine']['nproc']} CPUs, "
             f"{r['machine']['date']}.", "",
             "| way | dropped | massive left | FVE held-out non-massive | FVE held-out all | massive rel. err | "
             "dead @25% | dead @end | L0 (k / nonzero) | spikes (w/ massive) | max spike ratio | max/median loss, 2nd half | "
             "gamma of pool | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for way, w in r["ways"].items():
        name = f"({way}) {WAYS[way]}" + (f" = ({w['same_as']})" if w.get("same_as") else "")
        lines.append(f"| {name} | {w['dropped']:,} | {w['massive_left']:,} | {w['fve_nonmassive']:.4f} | {w['fve_all']:.4f} | "
                     f"{w['massive_rel_error']:.3f} | {w['dead']['25%']['fraction']:.1%} | {w['dead']['end']['fraction']:.1%} | "
                     f"{r['k']} / {w['l0_nonzero']:.1f} | {w['spikes']['count']} ({w['spikes']['with_massive_in_batch']}) | "
                     f"{w['spikes']['max_running_ratio']:.2f} | {w['spikes']['max_over_median_second_half']:.2f} | "
                     f"{w['gamma']:.3f} | {w['seconds']:.0f} |")
    dead = next(iter(r["ways"].values()))["dead"]
    a, s = r["mask_agreement"]["profile_mask"], r["mask_agreement"]["special_ids"]
    lines += ["",
              f"dead: no firing over the last {dead['end']['window']:,} training tokens (at 25%: the last "
              f"{dead['25%']['window']:,} of {dead['25%']['tokens']:,}). spikes: steps after the first 50 with loss > 3x the "
              f"median of the previous 50, (in brackets) those whose batch held a live-massive token; max spike ratio: the "
              f"largest such ratio; max/median loss: over the second half of training. "
              f"L0 nonzero: mean latents > 0 after the ReLU on held-out non-massive tokens. massive rel. err: mean "
              f"||x - x_hat|| / ||x|| on the held-out massive tokens.", "",
              f"gamma = ||mean|| / ||std|| of the training activations: {r['gamma']['all']:.3f} with the massive tokens, "
              f"{r['gamma']['without_massive']:.3f} without.", "",
              f"Against masks.live on the {r['training_tokens_unique']:,} training tokens ({a['massive']} massive): "
              f"Profile.mask (rules {r['profile']['rules_at_block']}, profile on {r['profile']['tokens']:,} other tokens) "
              f"flagged {a['flagged']}, precision {a['precision']:.3f}, recall {a['recall']:.3f}, agreement {a['agreement']:.5f}; "
              f"special ids {r['special_ids']} flagged {s['flagged']}, recall {s['recall']:.3f}. Massive tokens Profile.mask "
              f"missed: {len(r['missed_by_profile_mask'])}"
              + "".join(f"; {m['token']!r} at position {m['position']} (dim {m['dim']} = {m['value']:,.0f})"
                        for m in r["missed_by_profile_mask"][:20]) + ".", "",
              f"Time: caching {r['cache_seconds']:.0f}s, profile {r['profile']['seconds']:.0f}s, total {r['total_seconds']:.0f}s."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for way, w in results.items():
        if not w.get("same_as"):
            ax.plot(range(1, len(w["losses"]) + 1), w["losses"], label=f"({way}) {WAYS[way]}", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (sum over dims, mean over batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
