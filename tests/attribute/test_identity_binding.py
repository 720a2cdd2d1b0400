"""Weights are bound to modules by parameter identity, not by name: a TransformerLens bridge (its
`named_parameters()` says `layers.0…` where `named_modules()` says `blocks.0…`) and a Hugging Face
GPT-2 whose LM head is tied to the token embedding get feature rows in every family, and credit
finds its per-sample factors (float64, exact sums)."""

from __future__ import annotations

import pytest
import torch

import chisel
import probes
from chisel.attribution import ledger as L

VOCAB, CTX = 11, 8


def _bridge() -> torch.nn.Module:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    cfg = TransformerBridgeConfig(
        d_model=16, d_head=8, n_heads=2, n_layers=1, n_ctx=CTX, d_vocab=VOCAB, act_fn="gelu"
    )
    return TransformerBridge.boot_native(cfg).double()


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double()


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def _record(tmp_path, model: torch.nn.Module, tokens: torch.Tensor) -> chisel.Run:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, opt, tmp_path / "run", factors=True, dtype="float64") as rec:
        for _ in range(3):
            logits = _logits(model, tokens)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            loss.backward()
            rec.tag(advantage=torch.randn(len(tokens), dtype=torch.float64))
            opt.step()
            opt.zero_grad()
    return chisel.load(tmp_path / "run")


def _metric(tokens: torch.Tensor):
    def metric(model: torch.nn.Module) -> torch.Tensor:
        logp = torch.log_softmax(_logits(model, tokens)[:, :-1], -1)
        return logp.gather(-1, tokens[:, 1:, None]).mean()

    return metric


CASES = {
    # (model, feature site, its width, the param that must read it)
    "bridge_mlp": (_bridge, "blocks.0.mlp.hook_post", 64, "mlp._original_component.fc_out"),
    "gpt2_tied_head": (_gpt2, "lm_head:in", 16, "transformer.wte.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_features_bind_by_identity_in_every_family(tmp_path, case):
    make, site, width, reader = CASES[case]
    model = make()
    tokens = torch.randint(0, VOCAB, (4, CTX), generator=torch.Generator().manual_seed(1))
    run = _record(tmp_path, model, tokens)
    gen = torch.Generator().manual_seed(2)
    features = [probes.custom(f"f{i}", site, torch.randn(width, generator=gen)) for i in range(2)]
    ledger = chisel.attribute(run, model, features, _metric(tokens))
    assert ledger[ledger[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE].max() <= 1e-8
    reads = ledger[(ledger[L.QUANTITY] == L.ATTRIBUTION) & (ledger[L.FEATURE] == "f0")]
    params = set(reads[L.PARAM])
    assert len(params) == 1 and reader in params.pop()
    assert set(reads[L.FAMILY]) == {L.INTEGRATED, L.CREDIT}
    per_sample = chisel.attribute(run, model, features, _metric(tokens), families=("credit",),
                                  steps=[2])
    assert per_sample[L.SAMPLE].notna().sum() > 0  # factors matched to the weights by identity
    # the input split closes on the weight's share, and credit equals integrated per feature
    rows = ledger[ledger[L.QUANTITY] == L.ATTRIBUTION]
    param = reads[L.PARAM].iloc[0]
    for t in range(len(run)):
        step = rows[(rows[L.STEP] == t) & (rows[L.PARAM] == param) & (rows[L.FAMILY] == L.INTEGRATED)]
        whole = step[step[L.FEATURE] == L.WHOLE][L.VALUE].item()
        assert step[step[L.FEATURE] != L.WHOLE][L.VALUE].sum() == pytest.approx(whole, rel=1e-10, abs=1e-14)
    by_family = reads.groupby([L.FAMILY, L.STEP])[L.VALUE].sum().unstack(0)
    assert (by_family[L.CREDIT] - by_family[L.INTEGRATED]).abs().max() <= 1e-10 * by_family.abs().max().max()


def test_a_tied_head_is_attributed_once_under_the_recorded_name():
    from chisel.attribution.weights import linear_weights

    model = _gpt2()
    recorded = {n for n, _ in model.named_parameters()}
    assert "lm_head.weight" not in recorded  # named_parameters() lists the tied weight once
    heads = [w for w in linear_weights(model, recorded) if w.module == "lm_head"]
    assert [w.param for w in heads] == ["transformer.wte.weight"]
