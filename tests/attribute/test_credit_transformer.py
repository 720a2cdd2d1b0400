"""Credit on a tiny HF GPT-2: per-sample rows for the token and position embeddings, the
LayerNorms and the tied LM head, exact against materialised per-sample terms, and the update's
gradient part left unresolved drops from most of it (Linear-like factors only) to rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import chisel
from chisel.attribution import credit as C
from chisel.attribution import ledger as L
from chisel.attribution import optim_replay as R
from chisel.attribution.splits import read_kernels

transformers = pytest.importorskip("transformers")

VOCAB, D, N, T, STEPS = 50, 16, 4, 7, 4
TIED = "transformer.wte.weight"
NEW_KIND_PARAMS = [TIED, "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                   "transformer.h.0.ln_1.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"]


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def record(path, factors) -> chisel.Run:
    """AdamW with weight decay and clipping (c ≠ 1), per-sample rewards as tags."""
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    with chisel.record(model, opt, path, factors=factors, dtype="float64") as rec:
        for _ in range(STEPS):
            ids = torch.randint(0, VOCAB, (N, T), generator=gen)
            logits = model(input_ids=ids).logits[:, :-1]
            F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
            rec.tag(reward=torch.arange(N).double())
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    return chisel.load(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("credit_gpt2")
    linear_like = [n for n, m in gpt2().named_modules()
                   if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    return {"all": record(root / "all", True), "linear_only": record(root / "lin", linear_like)}


def flat(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def unresolved_share(run, leaf, part):
    """Over the run: ‖unresolved‖ / ‖part‖ of the update, all params together."""
    session = C.CreditSession(run)
    left = whole = 0.0
    for t in range(STEPS):
        split = C.split_update(run, t, session)
        left += float(flat(split.unresolved[leaf]).pow(2).sum())
        whole += float(flat(split.base.parts[part]).pow(2).sum())
    return (left / whole) ** 0.5


def test_unresolved_gradient_drops_to_rounding(runs):
    before = unresolved_share(runs["linear_only"], C.GRADIENT_UNRESOLVED, R.GRADIENT)
    after = unresolved_share(runs["all"], C.GRADIENT_UNRESOLVED, R.GRADIENT)
    momentum_before = unresolved_share(runs["linear_only"], C.MOMENTUM_UNRESOLVED, R.MOMENTUM)
    momentum_after = unresolved_share(runs["all"], C.MOMENTUM_UNRESOLVED, R.MOMENTUM)
    print(f"gradient unresolved share {before:.3g} -> {after:.3g}; "
          f"momentum {momentum_before:.3g} -> {momentum_after:.3g}")
    assert before > 0.3 and momentum_before > 0.3  # the tied embedding's gradient dominates
    assert after < 1e-10 and momentum_after < 1e-10


def test_the_clip_coefficient_ignores_a_weight_shared_with_a_module_without_factors(runs):
    """With only the head's factors, the tied weight's gradient is not rebuilt by them; the
    clip coefficient is fitted on the other weights and stays the true one."""
    for t in range(STEPS):
        full, partial = runs["all"].record(t), runs["linear_only"].record(t)
        assert abs(full.grad_coef - partial.grad_coef) <= 1e-12 * full.grad_coef
        assert partial.grad_coef_residual < 1e-12


def test_per_sample_blocks_for_embeddings_norms_and_the_tied_head(runs):
    run = runs["all"]
    session = C.CreditSession(run)
    for t in range(STEPS):
        split = C.split_update(run, t, session)
        assert split.not_captured == {}
        mine = {(b.param, b.module, b.kind) for b in split.blocks if b.part == R.GRADIENT}
        assert {(TIED, "transformer.wte", "embedding"), (TIED, "lm_head", "linear"),
                ("transformer.wpe.weight", "transformer.wpe", "embedding"),
                ("transformer.ln_f.weight", "transformer.ln_f", "layernorm"),
                ("transformer.ln_f.bias", "transformer.ln_f", "layernorm")} <= mine
        assert all(b.n == N for b in split.blocks)
        leaves = C.LEAVES
        rebuilt = {n: sum(split.leaves()[leaf][n] for leaf in leaves) for n in split.base.update}
        torch.testing.assert_close(flat(rebuilt), flat(split.base.update), rtol=0, atol=1e-14)


def test_embedding_and_norm_blocks_equal_their_materialised_terms(runs):
    run = runs["all"]
    split = C.split_update(run, STEPS - 1)  # AdamW: element-wise coefficients, momentum blocks
    gen = torch.Generator().manual_seed(2)
    checked = set()
    for b in split.blocks:
        if b.kind not in ("embedding", "layernorm"):
            continue
        shape = split.base.update[b.param].shape
        terms = b.terms(shape)  # [n, *shape], materialised by brute force
        gbar = torch.randn(shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(b.total(shape), terms.sum(0), rtol=0, atol=1e-15)
        # every kind's term is linear in g: weighting g per sample weights the term (what a
        # counterfactual that drops samples relies on)
        w = torch.rand(b.n, generator=gen, dtype=torch.float64)
        weighted = dataclasses.replace(b, g=b.g * w[:, None, None]).total(shape)
        torch.testing.assert_close(weighted, torch.einsum("n,n...->...", w, terms), rtol=0, atol=1e-15)
        want = (terms * gbar).flatten(1).sum(1)
        torch.testing.assert_close(b.attribution(gbar), want, rtol=1e-12, atol=1e-18)
        checked.add(b.param)
        if b.param == TIED:  # split by the head's read features, gathering kernel rows at the ids
            directions = torch.randn(3, D, generator=gen, dtype=torch.float64)
            kernels = read_kernels(("a", "b", "c"), ("lm_head:in",) * 3, directions, gbar)
            shares = b.kernel_shares(gbar, kernels)  # [n, K]
            brute = torch.einsum("nvd,kvd->nk", terms, kernels.weight)
            torch.testing.assert_close(shares, brute, rtol=1e-12, atol=1e-18)
            torch.testing.assert_close(shares.sum(1), want, rtol=1e-10, atol=1e-18)
    assert set(NEW_KIND_PARAMS) <= checked
    norm = next(b for b in split.blocks if b.kind == "layernorm")
    with pytest.raises(C.CreditError, match="elementwise, so no input features split it"):
        norm.feature_shares(torch.zeros(D), torch.eye(D)[:2])


def test_credit_rows_close_and_the_tied_weight_splits_by_the_heads_features(runs):
    run = runs["all"]
    t = STEPS - 1
    gen = torch.Generator().manual_seed(3)
    update = run.update(t)
    gbar = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in update.items()}
    directions = torch.linalg.qr(torch.randn(D, 2, generator=gen, dtype=torch.float64))[0].T
    kernels = read_kernels(("f0", "f1"), ("lm_head:in",) * 2, directions, gbar[TIED])
    rows = C.credit_rows(run, t, gbar, kernels_by_module={"lm_head": [kernels]})
    attribution = rows[(rows[L.QUANTITY] == L.ATTRIBUTION) & (rows[L.FAMILY] == L.CREDIT)]
    whole = attribution[attribution[L.FEATURE] == L.WHOLE]
    want = sum(float((update[n].double() * gbar[n]).sum()) for n in update)
    assert abs(float(whole[L.VALUE].sum()) - want) <= 1e-10 * abs(want)
    # every part of the tied weight (embedding rows, head rows, momentum, decay) is split by the
    # head's kernels, so each feature's credit is ⟨ΔW, R_k⟩: the integrated family's row
    tied = attribution[(attribution[L.PARAM] == TIED) & (attribution[L.FEATURE] != L.WHOLE)]
    per_feature = tied.groupby(L.FEATURE)[L.VALUE].sum()
    expected = kernels.shares(update[TIED].double())
    for k, label in enumerate(kernels.labels):
        assert abs(per_feature[label] - float(expected[k])) <= 1e-10 * float(expected.abs().max())
    # per-sample rows with the step's tags, for the new kinds
    samples = whole[whole[L.SAMPLE].notna() & (whole[C.PART] == R.GRADIENT)]
    for param in NEW_KIND_PARAMS:
        mine = samples[samples[L.PARAM] == param]
        assert sorted(mine[L.SAMPLE].unique()) == list(range(N))
        assert mine["tag/reward"].notna().all()
    assert (rows[L.QUANTITY] == C.NOT_CAPTURED_SHARE).sum() == 0


@pytest.mark.parametrize("vocab", [200, 1000])
def test_token_ids_under_a_compact_factor_dtype(tmp_path, vocab):
    """A compact `factor_dtype` is for activations and gradients: the writer keeps token ids as
    integers, so they are exact beyond bfloat16's 256 too (runs written before that are refused
    by credit with the fix, rather than credited to the wrong rows: `_token_ids`)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(vocab, 3), nn.Linear(3, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 199, 5], [7, 0, 199]]) + (vocab - 200)
    with chisel.record(model, opt, tmp_path / "run", factors=True, factor_dtype="bfloat16"):
        model(ids).sum().backward()
        opt.step()
    run = chisel.load(tmp_path / "run")
    split = C.split_update(run, 0)
    block = next(b for b in split.blocks if b.kind == "embedding")
    assert torch.equal(block.x, ids)
