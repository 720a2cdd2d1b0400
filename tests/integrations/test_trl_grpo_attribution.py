"""A real TRL `GRPOTrainer` run of a tiny random-init GPT-2 (2 blocks, in-process tokenizer,
CPU, offline) recorded by `chisel.integrations.hf.ChiselCallback`, then attributed end to end to
features in the residual stream (integrated + credit).

What TRL 1.16 does that matters here, and what the test holds chisel to:
- GRPO's loss gets its log-probs from a fused LM head (`trl.trainer.utils.add_fused_lm_head`:
  tiles of `lm_head.weight` times the hidden states), never calling the `lm_head` module, so
  its forward hook never sees the computation. The recording must say so by name
  (`FactorsSkippedWarning`), and credit must report that share as unresolved, not drop it.
- The sums still close: integrated is complete, and credit equals integrated feature by
  feature on every weight whose factors were captured (block 1's readers of the stream).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")


import chisel
import probes
from chisel.attribution import ledger as L
from chisel.integrations import hf
from tests.integrations.test_hf import _args, _model, _reward_count_a, _tokenizer

pytestmark = pytest.mark.slow

SITE = "transformer.h.0:out"  # the residual stream after block 0: no Linear reads it directly
HEAD = "transformer.wte.weight"  # the tied LM head's weight, recorded under the embedding's name


def _train(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = _tokenizer()
    model = _model(tokenizer, n_layer=2)  # block 1 reads the stream after block 0
    prompts = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"] * 4})
    args = _args(GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                 gradient_accumulation_steps=2, max_completion_length=6, max_steps=3,
                 learning_rate=1e-2, temperature=1.0)
    callback = hf.ChiselCallback(tmp_path / "run", factors=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[_reward_count_a], args=args,
                          train_dataset=prompts, processing_class=tokenizer, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    gaps = [str(w.message) for w in caught if issubclass(w.category, chisel.FactorsSkippedWarning)]
    # TRL leaves its fused-head forward on the model (`model.forward = MethodType(...)`, closing
    # over the ORIGINAL model's bound forward): a deep copy (chisel's private copy) would run the
    # original's modules and parameters. Back to the class's forward, and no activation
    # checkpointing (GRPOConfig's default), for attribution.
    assert "forward" in vars(model)
    del model.forward
    model.gradient_checkpointing_disable()
    return model.eval(), chisel.load(tmp_path / "run"), gaps


def test_grpo_run_attributes_to_stream_features(tmp_path):
    model, run, gaps = _train(tmp_path)
    assert len(run) == 3
    # no silent factor gaps: each factor module has factors at every step, or a warning names it
    for module in run.manifest["factor_modules"]:
        seen = [module in run.factors(t) for t in range(len(run))]
        assert all(seen) or any(f"'{module}'" in g or f"{module} (" in g for g in gaps), module
    head_seen = all("lm_head" in run.factors(t) for t in range(len(run)))
    if not head_seen:  # TRL's fused head: the recording names the bypassed module
        assert any("'lm_head'" in g and "never saw the computation" in g for g in gaps), gaps

    ids = torch.tensor([[2, 3, 4, 5, 2, 2], [6, 7, 2, 2, 3, 2]])

    def metric(m):  # mean log-prob of fixed sequences
        logp = torch.log_softmax(m(ids).logits[:, :-1].double(), -1)
        return logp.gather(-1, ids[:, 1:, None]).mean()

    acts = probes.capture(model, ids, [SITE])[SITE].reshape(-1, 32)  # [B*T, d]
    gen = torch.Generator().manual_seed(0)
    features = [probes.custom(f"f{i}", SITE, torch.randn(32, generator=gen)) for i in range(2)]
    features += list(probes.pca(acts, 1, SITE))  # the stream's top principal direction, "pc0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tied head has no bias: split uncentred
        ledger = chisel.attribute(run, model, features, metric,
                                  families=(L.INTEGRATED, L.CREDIT), progress=False)
    rel = ledger[ledger[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE]
    # quadrature error only (16 points); the first Adam step (every weight moves by ~lr) is the
    # roughest path: measured 1.9e-6 there, 1e-11 and below after
    assert len(rel) == 3 and rel.max() <= 1e-5
    rows = ledger[ledger[L.QUANTITY] == L.ATTRIBUTION]
    for name in ("f0", "f1", "pc0"):
        mine = rows[rows[L.FEATURE] == name]
        params = set(mine[L.PARAM])
        # the stream feature reaches block 1's readers and the tied head
        assert HEAD in params and any(p.startswith("transformer.h.1.") for p in params), params
        factored = mine[mine[L.PARAM] != HEAD] if not head_seen else mine
        sums = factored.groupby([L.FAMILY, L.STEP])[L.VALUE].sum().unstack(0)
        scale = sums[L.INTEGRATED].abs().max()
        assert scale > 0 and len(sums) == 3
        assert (sums[L.CREDIT] - sums[L.INTEGRATED]).abs().max() <= 1e-9 * scale, name
    # per-completion credit rows (each weight's share, by sample), tagged with GRPO's advantage
    # and reward, on every block-1 reader of the stream
    credit = ledger[ledger[L.FAMILY] == L.CREDIT]
    samples = rows[(rows[L.FAMILY] == L.CREDIT) & rows[L.SAMPLE].notna()]
    assert {"transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"} <= set(
        samples[L.PARAM])
    assert samples["tag/advantage"].notna().all() and samples["tag/reward"].notna().all()
    if not head_seen:  # what no factor covers is reported, never dropped
        assert "gradient (unresolved)" in set(credit["part"].dropna())
        share = credit[credit[L.QUANTITY] == "not_captured_share"][L.VALUE]
        assert len(share) == 3 and (share > 0).all()
