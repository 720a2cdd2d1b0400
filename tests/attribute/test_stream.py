"""Residual-stream features: a feature at a site no Linear reads directly binds, through norms and
residual additions, to every weight that reads the stream (a TransformerLens bridge), the splits
close exactly, and a planted stream direction is recovered behind a LayerNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L

VOCAB, CTX, D = 11, 8, 16


def _bridge(layers: int = 2) -> nn.Module:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    cfg = TransformerBridgeConfig(
        d_model=D, d_head=8, n_heads=2, n_layers=layers, n_ctx=CTX, d_vocab=VOCAB, act_fn="gelu"
    )
    return TransformerBridge.boot_native(cfg).double().eval()


def test_a_stream_feature_binds_to_every_reader_of_the_stream(tmp_path):
    model = _bridge()
    tokens = torch.randint(0, VOCAB, (4, CTX), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, opt, tmp_path / "run", factors=True, dtype="float64") as rec:
        for _ in range(2):
            logits = model(tokens)[:, :-1]
            torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
            rec.tag()
            opt.step()
            opt.zero_grad()

    def metric(m: nn.Module) -> torch.Tensor:
        logp = torch.log_softmax(m(tokens)[:, :-1], -1)
        return logp.gather(-1, tokens[:, 1:, None]).mean()

    gen = torch.Generator().manual_seed(2)
    features = [probes.custom(f"r{i}", "blocks.0.hook_resid_pre", torch.randn(D, generator=gen)) for i in range(3)]
    ledger = chisel.attribute(tmp_path / "run", model, features, metric)
    assert ledger[ledger[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE].max() <= 1e-8
    reads = ledger[(ledger[L.QUANTITY] == L.ATTRIBUTION) & (ledger[L.FEATURE] == "r0")]
    readers = {p.replace("._original_component", "") for p in reads[L.PARAM]}
    want = {f"layers.{i}.attn.{x}.weight" for i in range(2) for x in "qkv"}
    want |= {f"layers.{i}.mlp.fc_in.weight" for i in range(2)} | {"head.weight"}
    assert readers == want  # every reader behind a LayerNorm, in both layers, and the unembed
    # each reader's input split closes on its share; credit equals integrated per feature
    rows = ledger[(ledger[L.QUANTITY] == L.ATTRIBUTION) & (ledger[L.FAMILY] == L.INTEGRATED)]
    for _, group in rows[rows[L.PARAM].isin(set(reads[L.PARAM]))].groupby([L.STEP, L.PARAM]):
        whole = group[group[L.FEATURE] == L.WHOLE][L.VALUE].item()
        assert group[group[L.FEATURE] != L.WHOLE][L.VALUE].sum() == pytest.approx(whole, rel=1e-10, abs=1e-14)
    by_family = reads.groupby([L.FAMILY, L.STEP, L.PARAM])[L.VALUE].sum().unstack(0)
    assert (by_family[L.CREDIT] - by_family[L.INTEGRATED]).abs().max() <= 1e-10 * by_family.abs().max().max()


class _Normed(nn.Module):
    """x → LayerNorm → head: no Linear reads x itself."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def _planted_share(tmp_path, seed: int) -> tuple[float, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    u = u - u.mean()  # a direction LayerNorm's centring keeps
    u = u / u.norm()
    torch.manual_seed(seed)
    model = _Normed().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D, generator=gen, dtype=torch.float64)
        return x, (x @ u > 0).long()  # the label is the planted direction's sign

    with chisel.record(model, opt, tmp_path / f"run{seed}", dtype="float64") as rec:
        for _ in range(30):
            x, y = batch(64)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            rec.tag()
            opt.step()
            opt.zero_grad()
    x, y = batch(256)
    metric = chisel.metrics.logprob(x, y)
    randoms = [torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(4)]
    features = [probes.custom("u", "norm:in", u)] + [
        probes.custom(f"rand{i}", "norm:in", r) for i, r in enumerate(randoms)
    ]
    # one feature per attribution, so that each random direction is judged on its own
    shares = {}
    for f in features:
        ledger = chisel.attribute(tmp_path / f"run{seed}", model, [f], metric, families=("integrated",))
        shares[f.name] = float(chisel.timeline(ledger).iloc[-1][f.name])
    return shares["u"], [shares[f"rand{i}"] for i in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_planted_stream_direction_is_recovered_behind_a_layernorm(tmp_path, seed):
    planted, randoms = _planted_share(tmp_path, seed)
    mean_random = sum(abs(r) for r in randoms) / len(randoms)
    assert planted > 0.05 and planted >= 10 * mean_random, (planted, randoms)


def test_the_validation_reverts_stream_pathways_as_the_ledger_splits_them(tmp_path):
    """The reversion game binds like the engine: a feature behind a LayerNorm has a pathway on the
    head, and reverting it is first-order the ledger's cumulative share (small steps: close)."""
    _planted_share(tmp_path, 0)
    torch.manual_seed(0)
    model = _Normed().double()
    run = chisel.load(tmp_path / "run0")
    x = torch.randn(128, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    metric = chisel.metrics.logprob(x, torch.zeros(128, dtype=torch.long))
    feats = [probes.custom("s", "norm:in", torch.randn(D, generator=torch.Generator().manual_seed(6)))]
    effects = chisel.pathway_effects(run, model, feats, metric)
    row = effects[effects["feature"] == "s"]
    assert list(row["param"]) == ["head.weight"]
    ledger = chisel.attribute(run, model, feats, metric, families=("integrated",))
    table = chisel.validation_table(ledger, effects)
    assert table.loc[table["feature"] == "s", "attribution"].notna().all()
