"""Compact recording of a ≥ 25M-parameter transformer vs full fp32 recording of the same training.

A GPT-2 (d_model 512, 8 layers, 8 heads, vocabulary 8192, tied embeddings; random init, CPU,
float32) trains a few Adam steps on a fixed random batch, twice from the same seed: once recorded in
full (`chisel.record` defaults: θ and the gradient in float32 every step) and once compact
(`compact=chisel.Compact(rank=...)`: rank-r factors of each weight's update, exact keyframes, the
residual of a closed interval spread over its steps, grads off). Prints:

- the parameter count; bytes per step of each recording (mean step-file size) and their ratio,
  also against full recording without gradients; keyframe bytes, amortised at K steps;
- per step, the relative error of the compact `run.update(t)` that the run states
  (`run.update_error(t) / ‖Δθ_t‖`) and the one measured against the full run (must not exceed it);
- θ at every keyframe of the compact run compared with the full run (bit for bit);
- attribution agreement: `chisel.attribute` (integrated family; random directions at a residual
  stream site and at an MLP's hidden activation; two metrics: the mean log-probability of the
  training batch, and of a held-out random batch) on both runs: per step Δm, and over the
  (step, param, feature) rows the largest difference relative to the largest |row|, the relative
  L2 difference and the Spearman rank correlation; the same for the per-feature totals over the
  run and per (step, feature).

Usage: python benchmarks/compact.py [--steps 4] [--rank 4] [--points 2] [--threads 2] [--feedback]
       [--lr 1e-3] [--metrics train|held-out|both]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.validation.agreement import spearman

VOCAB, CTX, D, LAYERS, HEADS, BATCH = 8192, 32, 512, 8, 8, 4


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def train(model: nn.Module, run_dir: Path, steps: int, tokens: torch.Tensor, lr: float, **options) -> float:
    """`steps` Adam steps of next-token loss on `tokens`, recorded into run_dir; seconds taken."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    with chisel.record(model, opt, run_dir, **options):
        for _ in range(steps):
            logits = model(tokens).logits[:, :-1]
            nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    return time.perf_counter() - start


def file_bytes(folder: Path) -> list[int]:
    return [p.stat().st_size for p in sorted(folder.glob("*.safetensors"))]


def compare(name: str, full: torch.Tensor, compact: torch.Tensor) -> None:
    diff = (full - compact).abs()
    print(f"  {name}: {len(full)} rows; max |diff| / max |row| = {float(diff.max() / full.abs().max()):.2e}; "
          f"‖diff‖/‖full‖ = {float((full - compact).norm() / full.norm()):.2e}; "
          f"Spearman = {spearman(full.numpy(), compact.numpy())[0]:.6f}")  # ties share their rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--keyframe-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--feedback", action="store_true", help="Compact(feedback=True) (default: False)")
    parser.add_argument("--metrics", choices=("train", "held-out", "both"), default="both")
    parser.add_argument("--points", type=int, default=2, help="Gauss-Legendre points of the integrated family")
    args = parser.parse_args()
    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = gpt2()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 d_model {D}, {LAYERS} layers, vocab {VOCAB}, context {CTX}: {n_params:,} parameters "
          f"({n_params * 4 / 2**20:.1f} MiB fp32); {args.steps} Adam steps, lr {args.lr}; "
          f"compact rank {args.rank}, feedback {args.feedback}")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, CTX), generator=gen)
    held_out = torch.randint(0, VOCAB, (BATCH, CTX), generator=gen)
    init = copy.deepcopy(model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs, finals = {}, {}
        for mode, options in (
            ("full", {}),
            ("compact", {"compact": chisel.Compact(rank=args.rank, feedback=args.feedback),
                         "keyframe_every": args.keyframe_every}),
        ):
            model.load_state_dict(init)
            secs = train(model, root / mode, args.steps, tokens, args.lr, **options)
            runs[mode] = chisel.load(root / mode)
            finals[mode] = {n: p.detach().clone() for n, p in model.named_parameters()}
            print(f"{mode}: {args.steps} steps recorded in {secs:.1f} s")
        same = all(torch.equal(finals["full"][n], finals["compact"][n]) for n in finals["full"])
        print(f"training identical under both recorders: {same}")

        full, compact = runs["full"], runs["compact"]
        fb, cb = file_bytes(root / "full/steps"), file_bytes(root / "compact/steps")
        per_f, per_c = sum(fb) / len(fb), sum(cb) / len(cb)
        theta_bytes = n_params * 4
        print("\nbytes per step (mean step file):")
        print(f"  full fp32 (θ + grads, the default): {per_f / 2**20:.2f} MiB")
        print(f"  compact rank {args.rank}: {per_c / 2**10:.1f} KiB")
        print(f"  ratio: {per_f / per_c:.0f}x (vs full fp32 without grads, θ only: {theta_bytes / per_c:.0f}x)")
        kb = file_bytes(root / "compact/keyframes")
        print(f"  compact keyframes (as in full recording): {', '.join(f'{b / 2**20:.0f}' for b in kb)} MiB "
              f"(θ, plus Adam's state once it exists); amortised over K steps: "
              f"{(per_c + kb[-1] / 100) / 2**10:.0f} KiB per step at K=100, "
              f"{(per_c + kb[-1] / 1000) / 2**10:.0f} KiB at K=1000; θ-only keyframes "
              f"(optim_state='none') at K=1000: {(per_c + theta_bytes / 1000) / 2**10:.0f} KiB")
        start = time.perf_counter()
        for run in runs.values():
            for t in range(len(run)):
                run.params(t), run.update(t)
        print(f"  reading θ_t and Δθ_t of every step of both runs: {time.perf_counter() - start:.1f} s")

        print("\nper-step error of compact run.update(t) and run.params(t), relative to ‖Δθ_t‖ and ‖θ_t‖:")
        worst = 0.0
        for t in range(len(compact)):
            uf, uc = full.update(t), compact.update(t)
            norm = math.sqrt(sum(float(v.square().sum()) for v in uf.values()))
            measured = math.sqrt(sum(float((uf[n] - uc[n]).square().sum()) for n in uf))
            stored = compact.record(t).compact["update_error"]
            pf, pc = full.params(t), compact.params(t)
            p_measured = math.sqrt(sum(float((pf[n].double() - pc[n].double()).square().sum()) for n in pf))
            worst = max(worst, measured / max(compact.update_error(t), 1e-300),
                        p_measured / max(compact.params_error(t), 1e-300))
            print(f"  step {t}: update: stated bound {compact.update_error(t) / norm:.3f}, measured vs full "
                  f"{measured / norm:.3f} (the stored product alone: {stored / norm:.3f}); "
                  f"θ_t: bound {compact.params_error(t) / _norm(pf):.2e}, measured {p_measured / _norm(pf):.2e}")
        print(f"  measured / stated bound, worst: {worst:.6f} (≤ 1)")
        for k in compact.keyframes:
            pf, pc = full.params(k), compact.params(k)
            print(f"  keyframe {k}: θ equal to the full run bit for bit: {all(torch.equal(pf[n].double(), pc[n].double()) for n in pf)}")

        site_stream, site_mlp = "transformer.h.3:out", "transformer.h.3.mlp.act:out"
        fgen = torch.Generator().manual_seed(2)
        features = [probes.custom(f"stream{i}", site_stream, torch.randn(D, generator=fgen)) for i in range(8)]
        features += [probes.custom(f"mlp{i}", site_mlp, torch.randn(4 * D, generator=fgen)) for i in range(8)]
        for label, batch in (("the training batch", tokens), ("a held-out random batch", held_out)):
            if args.metrics != "both" and (args.metrics == "train") != (batch is tokens):
                continue
            agreement(runs, model, features, log_prob(batch), label, args.points)
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")


def log_prob(batch: torch.Tensor):
    def metric(m: nn.Module) -> torch.Tensor:
        logp = torch.log_softmax(m(batch).logits[:, :-1], -1)
        return logp.gather(-1, batch[:, 1:, None]).mean()

    return metric


def agreement(runs: dict, model: nn.Module, features: list, metric, label: str, points: int) -> None:
    """`chisel.attribute` (integrated family) on both runs; how far the compact ledger is from the full one."""
    ledgers = {}
    for mode, run in runs.items():
        start = time.perf_counter()
        ledgers[mode] = chisel.attribute(run, model, features, metric, families=("integrated",),
                                        points=points, dtype=torch.float32, progress=False)
        print(f"\nattribution of the {mode} run, metric: mean log-prob of {label}: "
              f"{time.perf_counter() - start:.0f} s")
    print(f"attribution agreement (integrated family, compact vs full; mean log-prob of {label}):")
    q = {m: led[led[L.QUANTITY] == L.DELTA_METRIC].sort_values(L.STEP)[L.VALUE] for m, led in ledgers.items()}
    for t, (a, b) in enumerate(zip(q["full"], q["compact"])):
        print(f"  step {t}: Δm full {a:+.6e}, compact {b:+.6e}")
    print(f"  Σ Δm over the run: full {q['full'].sum():+.8e}, compact {q['compact'].sum():+.8e}")
    rows = {}
    for mode, led in ledgers.items():
        sel = led[(led[L.QUANTITY] == L.ATTRIBUTION) & led[L.FEATURE].str.match(r"^(stream|mlp)\d$")]
        rows[mode] = sel.groupby([L.STEP, L.PARAM, L.FEATURE])[L.VALUE].sum()
    joined = rows["full"].to_frame("full").join(rows["compact"].to_frame("compact"), how="inner")
    compare("rows (step, param, feature)", torch.tensor(joined["full"].values), torch.tensor(joined["compact"].values))
    totals = joined.groupby(level=L.FEATURE).sum()
    compare("per-feature totals over the run", torch.tensor(totals["full"].values),
            torch.tensor(totals["compact"].values))
    steps = joined.groupby(level=[L.STEP, L.FEATURE]).sum()
    compare("per (step, feature), summed over params", torch.tensor(steps["full"].values),
            torch.tensor(steps["compact"].values))


def _norm(params: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in params.values()))


if __name__ == "__main__":
    main()
