"""Compact recording of a small GPT-2 against full recording of the same training: θ at every
keyframe bit for bit, every step's stated error equal (float64 rounding) to the measured one, the
telescoped sum of updates closing at keyframes, a run still being written (or killed) readable up
to its last step, the manifest naming the encoding, and bad options refused."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import chisel
from chisel.store import compact as C

VOCAB, CTX, D, BATCH, STEPS, K = 50, 8, 32, 4, 7, 3


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=D, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def _train(run_dir, steps=STEPS, *, close=True, **options):
    """`steps` Adam steps of next-token loss (float32), recorded; (final θ, recorder)."""
    model = _gpt2()
    tokens = torch.randint(0, VOCAB, (BATCH, CTX), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = chisel.record(model, opt, run_dir, **options)
    for _ in range(steps):
        logits = model(tokens).logits[:, :-1]
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    if close:
        rec.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, rec


def _norm(a: dict, b: dict | None = None) -> float:
    return math.sqrt(sum(float((a[n].double() - (b[n].double() if b else 0)).square().sum()) for n in a))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final_full, _ = _train(root / "full", keyframe_every=K)
        final_compact, _ = _train(root / "compact", compact=chisel.Compact(rank=2), keyframe_every=K)
    assert all(torch.equal(final_full[n], final_compact[n]) for n in final_full)  # training untouched
    return chisel.load(root / "full"), chisel.load(root / "compact")


def test_manifest_names_the_encoding_and_grads_are_off(runs):
    full, compact = runs
    enc = {p["name"]: p["encoding"] for p in compact.manifest["params"]}
    assert enc["transformer.h.0.attn.c_attn.weight"] == C.LOWRANK_ENCODING
    assert enc["transformer.wte.weight"] == C.LOWRANK_ENCODING
    assert enc["transformer.wpe.weight"] == C.EXACT_ENCODING  # 8×32: rank-2 factors would not shrink it
    assert enc["transformer.h.0.ln_1.weight"] == C.EXACT_ENCODING
    assert compact.manifest["config"]["compact"]["rank"] == 2
    assert compact.manifest["config"]["grads"] is False
    with pytest.raises(chisel.ChiselError, match="grads=False"):
        compact.grads(0)
    from chisel.store.verify import verify_run

    assert verify_run(compact.path).ok, verify_run(compact.path).problems  # `chisel verify` accepts it
    # the records' norms are the true ones (the writer has θ), equal to the full run's
    assert list(compact.steps["update_norm"]) == [full.record(t).update_norm for t in range(STEPS)]


def test_keyframes_are_the_full_runs_theta_bit_for_bit(runs):
    full, compact = runs
    assert compact.keyframes == [0, 3, 6, 7] and len(compact) == STEPS
    for k in compact.keyframes:
        pf, pc = full.params(k), compact.params(k)
        assert all(torch.equal(pf[n].double(), pc[n].double()) for n in pf), k
        assert all((pc[n].dtype == torch.float64) == (e == C.LOWRANK_ENCODING) for n, e in compact._encodings.items())
        assert compact.params_error(k) == 0.0
    between = compact.params(4)
    assert not all(torch.equal(full.params(4)[n].double(), between[n].double()) for n in between)  # lossy


def test_every_step_states_its_true_error_and_a_bound_that_holds(runs):
    """The stored product's error in the record is the true one (‖full.update(t) − product‖, float64),
    and so is ‖θ_t − θ̂_t‖ before the residual is spread; run.update_error / params_error bound
    the distance of run.update / run.params to the full run (all intervals here are closed)."""
    full, compact = runs
    for t in range(len(compact)):
        uf, uc = full.update(t), compact.update(t)
        field = compact.record(t).compact
        stored = compact._compact.stored_update(t)
        assert _norm(uf, stored) == pytest.approx(field["update_error"], rel=1e-9, abs=1e-15)
        assert _norm(uf, uc) <= compact.update_error(t) * (1 + 1e-9) + 1e-15
        sp = compact._compact.spread(t)
        assert sp is not None and compact.update_error(t) == pytest.approx(
            field["update_error"] + sp.weights[t - sp.start] * sp.size, rel=1e-12
        )
        pf, pc = full.params(t), compact.params(t)
        assert _norm(pf, pc) <= compact.params_error(t) * (1 + 1e-9) + 1e-15
        raw = compact._compact._lowrank(t)  # θ̂ before the spread: its stored error is exact
        measured = _norm({n: v.reshape(pf[n].shape) for n, v in raw.items()}, {n: pf[n] for n in raw})
        before = field["error_before"]
        assert measured == pytest.approx(before, rel=1e-9, abs=1e-15)
        # Adam's updates are far from rank 2: lossy at every step but one between two keyframes
        assert (field["update_error"] == 0) == (field["error_after"] == 0) and field["update_error"] > 0
        exact = [n for n, e in compact._encodings.items() if e == C.EXACT_ENCODING]
        assert all(torch.equal(uf[n], uc[n]) for n in exact)


def test_spreading_the_residual_brings_the_steps_nearer_the_truth(runs):
    """Over the run, spreading each closed interval's residual by the steps' true norms gives
    updates and θ nearer the full run than the stored products alone (with the residual all on
    the interval's last step, as the products alone would need to close the interval)."""
    full, compact = runs
    spread = sum(_norm(full.update(t), compact.update(t)) ** 2 for t in range(len(compact)))
    products = 0.0
    for t in range(len(compact)):
        stored = compact._compact.stored_update(t)
        sp = compact._compact.spread(t)
        if t == sp.end - 1:  # the last step would carry the whole residual
            stored = {n: v + sp.residual[n].reshape(v.shape) if n in sp.residual else v for n, v in stored.items()}
        products += _norm(full.update(t), stored) ** 2
    assert spread < 0.8 * products


def test_telescoped_sum_closes_at_every_keyframe(runs):
    """θ_k + Σ_{k ≤ s < k'} run.update(s) = θ_{k'} for consecutive keyframes, up to float64 rounding
    of the sum; without ending at the keyframe it would miss by ‖θ − θ̂‖ of the last step."""
    _, compact = runs
    kfs = compact.keyframes
    for k0, k1 in itertools.pairwise(kfs):
        acc = {n: v.double() for n, v in compact.params(k0).items()}
        for s in range(k0, k1):
            for n, v in compact.update(s).items():
                acc[n] += v
        target = compact.params(k1)
        miss = _norm(acc, target)
        assert miss <= 1e-13 * _norm(target), (k0, k1, miss)
        if k1 - 1 > k0:  # without the residual the products alone would miss by ‖r‖
            assert compact._compact.spread(k0).size > 1e6 * max(miss, 1e-300)


def test_updates_and_params_agree_in_float64(runs):
    _, compact = runs
    for t in range(len(compact)):
        a, b, u = compact._compact.params64(t), compact._compact.params64(t + 1), compact.update(t)
        assert all(torch.allclose(b[n] - a[n], u[n], rtol=0, atol=1e-12 * float(u[n].abs().max())) for n in a)


def test_a_run_still_being_written_reads_up_to_its_last_step(tmp_path):
    """No final keyframe yet (a killed process leaves the same files): every written step reads,
    its update is the stored product with its measured error; after close() the interval is
    closed and its residual spread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final, rec = _train(tmp_path / "run", steps=4, close=False, compact=True)
        rec.flush()
        run = chisel.load(tmp_path / "run")
        assert len(run) == 4 and run.keyframes == [0]
        open_update = run.update(3)
        assert run._compact.spread(3) is None
        assert run.update_error(3) == run.record(3).compact["update_error"]
        assert run.params_error(3) == run.record(2).compact["error_after"]
        theta4 = run.params(4)  # lossy: no keyframe yet
        assert _norm(theta4, final) > 0
        rec.close()
    run = chisel.load(tmp_path / "run")
    assert run.keyframes == [0, 4] and run._compact.spread(3).end == 4
    assert all(torch.equal(run.params(4)[n].double(), final[n].double()) for n in final)
    assert run.update_error(3) > run.record(3).compact["update_error"]
    assert _norm(run.update(3), open_update) > 0


def test_default_is_rank_4_float16_and_grads_can_be_asked_for(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(tmp_path / "run", steps=2, compact=True, grads=True)
    run = chisel.load(tmp_path / "run")
    assert run.manifest["config"]["compact"] == {"rank": 4, "factor_dtype": "float16", "oversample": 4,
                                                 "power_iters": 2, "feedback": False}
    assert set(run.grads(1)) == set(run.param_names)
    assert run.record(0).compact["update_error"] < run.record(0).update_norm  # step 0: a best rank-4 view


@pytest.mark.parametrize("compact", ["yes", 4, {"rank": 2}])
def test_bad_compact_options_are_refused_before_anything_is_written(tmp_path, compact):
    model = _gpt2()
    with pytest.raises(chisel.RecordConfigError, match="compact="):
        chisel.record(model, torch.optim.Adam(model.parameters()), tmp_path / "run", compact=compact)
    assert not (tmp_path / "run").exists()


def test_full_runs_state_zero_error(runs):
    full, _ = runs
    assert full.update_error(0) == 0.0 and full.params_error(3) == 0.0


def test_attribution_totals_agree_over_a_keyframe_interval_and_credit_is_refused(runs):
    """Integrated attribution on the compact run: its Σ Δm over the keyframe interval [0, 3) is
    the full run's (both are m(θ_3) − m(θ_0)), while its steps inside differ; credit
    needs the gradients a compact run does not store: a ChiselError that says so."""
    from chisel.attribution import ledger as L

    full, compact = runs
    model = _gpt2()
    tokens = torch.randint(0, VOCAB, (BATCH, CTX), generator=torch.Generator().manual_seed(5))

    def metric(m):
        logp = torch.log_softmax(m(tokens).logits[:, :-1], -1)
        return logp.gather(-1, tokens[:, 1:, None]).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ledgers = [chisel.attribute(r, model, [], metric, families=("integrated",), steps=range(3), points=4,
                                    progress=False) for r in (full, compact)]
        with pytest.raises(chisel.ChiselError, match="grads=False"):
            chisel.attribute(compact, model, [], metric, families=("credit",), steps=[0], progress=False)
    dm = [led[led[L.QUANTITY] == L.DELTA_METRIC].sort_values(L.STEP)[L.VALUE].to_numpy() for led in ledgers]
    assert abs(dm[0].sum() - dm[1].sum()) <= 1e-12 * abs(dm[0]).sum()
    assert abs(dm[0] - dm[1]).max() > 1e-6 * abs(dm[0]).max()  # the steps inside differ: lossy


def test_each_stored_product_is_the_steps_own_best_rank_r_view(runs):
    """Default feedback=False: each stored product is the rank-2 view of that step's own Δθ_t, so its
    measured error is below ‖Δθ_t‖ at every step."""
    full, compact = runs
    assert compact.manifest["config"]["compact"]["feedback"] is False
    for t in range(len(compact)):
        assert 0 < compact.record(t).compact["update_error"] < _norm(full.update(t))


def test_a_damaged_compact_manifest_is_a_manifest_error(runs, tmp_path):
    import json
    import shutil

    _, compact = runs
    shutil.copytree(compact.path, tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["compact"]["rank"] = 0
    path.write_text(json.dumps(manifest))
    with pytest.raises(chisel.ManifestError, match=r"config\.compact\.rank"):
        chisel.load(tmp_path / "run")


def test_resume_keeps_the_compact_option(tmp_path):
    """Resuming a compact run continues it (the resume keyframe is exact, every step reads);
    resuming it without compact (or a full run with it) is refused before anything is written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(tmp_path / "run", steps=2, compact=True)
        for options in ({}, {"compact": chisel.Compact(rank=2)}):
            with pytest.raises(chisel.ResumeMismatchError, match="compact="):
                _train(tmp_path / "run", steps=1, resume=True, **options)
        final, _ = _train(tmp_path / "run", steps=2, resume=True, compact=True)
    run = chisel.load(tmp_path / "run")
    assert len(run) == 4 and run.keyframes == [0, 2, 4]
    assert all(torch.equal(run.params(4)[n].double(), final[n].double()) for n in final)
    assert run._compact.spread(1) is None  # the resumed model restarts from θ_0: not a continuation
    assert all(run.update_error(t) >= 0 for t in range(4))


def test_error_feedback_keeps_the_drift_bounded(tmp_path):
    """10 Adam steps at rank 2 in one keyframe interval: with feedback ‖θ_t − θ̂_t‖ levels off
    (measured 2.2 from step 4 on), without it the residuals add up (4.1 at step 9, still growing),
    both below ‖θ_10 − θ_0‖ = 6.1."""
    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for feedback in (True, False):
            _train(tmp_path / str(feedback), steps=10, compact=chisel.Compact(rank=2, feedback=feedback))
            run = chisel.load(tmp_path / str(feedback))
            errors[feedback] = [0.0] + [run.record(t).compact["error_after"] for t in range(9)]  # ‖θ_t − θ̂_t‖
    path = _norm(run.params(10), run.params(0))
    on, off = errors[True], errors[False]
    assert max(on[4:]) <= 1.05 * on[4] and on[9] < 0.4 * path
    assert all(b > a for a, b in itertools.pairwise(off)) and off[9] > 1.5 * on[9]
