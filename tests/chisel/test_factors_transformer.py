"""Per-sample factors of the layers of a transformer: Embedding (token rows, padding, position
embeddings broadcast over the batch), LayerNorm / RMSNorm (per-sample scale and shift sums), an LM
head tied to its embedding; and the warnings that name every layer left without factors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import chisel
from chisel.attribution import credit as C
from chisel.attribution.splits import read_kernels

TOL = 1e-10
VOCAB, D, N, T = 50, 16, 4, 7


def _record(tmp_path, model, loss_fn, *, factors=True, name="run"):
    """Record one SGD step (warnings kept); return (run, grads the optimizer saw, warnings)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with chisel.record(model, optimizer, tmp_path / name, factors=factors, dtype="float64") as rec:
            loss_fn(model).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            capture = rec._capture.factors
    texts = [str(w.message) for w in caught if issubclass(w.category, chisel.FactorsSkippedWarning)]
    return chisel.load(tmp_path / name), grads, texts, capture


def _rebuild(run, t: int) -> dict[str, torch.Tensor]:
    """Every factor param's gradient rebuilt from the stored factors alone (brute force, by kind);
    a weight shared by several modules gets the sum of their terms."""
    meta = run.manifest["factor_modules"]
    shapes = {p["name"]: p["shape"] for p in run.manifest["params"]}
    out: dict[str, torch.Tensor] = {}

    def add(name, value):
        out[name] = out.get(name, 0) + value

    for module, (x, g) in run.factors(t).items():
        m = meta[module]
        kind, weight = m["kind"], m["weight"]
        if kind in ("layernorm", "rmsnorm"):
            add(weight, x.sum(0).reshape(shapes[weight]))
            if "bias" in m:
                add(m["bias"], g.sum(0).reshape(shapes[m["bias"]]))
            continue
        rows_g = g.reshape(-1, g.shape[-1])
        if kind == "embedding":
            rows = torch.zeros(shapes[weight], dtype=g.dtype)
            add(weight, rows.index_add_(0, x.reshape(-1), rows_g))
        elif kind == "linear":
            add(weight, rows_g.T @ x.reshape(-1, x.shape[-1]))
        elif kind == "conv1d":
            add(weight, x.reshape(-1, x.shape[-1]).T @ rows_g)
        if "bias" in m:
            add(m["bias"], rows_g.sum(0))
    return out


def _assert_rebuilt(run, grads, names):
    rebuilt = _rebuild(run, 0)
    for name in names:
        torch.testing.assert_close(rebuilt[name], grads[name], rtol=0, atol=TOL, msg=name)


# -- Embedding -----------------------------------------------------------------------------------
class TokenModel(nn.Module):
    def __init__(self, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(12, 5, padding_idx=padding_idx)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_embedding_rows_with_repeated_tokens_and_padding(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().double()
    ids = torch.tensor([[3, 3, 0, 7, 3], [0, 0, 5, 5, 1], [11, 2, 3, 0, 11]])  # repeats, pads
    target = torch.randn(3, 5, 3, dtype=torch.float64)

    def loss_fn(m):
        return (m(ids) - target).pow(2).sum()

    run, grads, _, _ = _record(tmp_path, model, loss_fn)
    assert run.manifest["factor_modules"]["emb"]["kind"] == "embedding"
    xs, gs = run.factors(0)["emb"]
    assert xs.dtype == torch.int64 and torch.equal(xs[..., 0], ids)
    assert gs[ids == 0].abs().max() == 0  # padding rows get no gradient, so none is stored
    assert grads["emb.weight"][0].abs().max() == 0
    _assert_rebuilt(run, grads, ["emb.weight", "head.weight", "head.bias"])
    # brute force: each sample's own gradient, one at a time, is its scatter of rows
    reference = TokenModel().double()
    reference.load_state_dict(run.params(0))
    for i in range(3):
        reference.zero_grad()
        (reference(ids[i : i + 1]) - target[i : i + 1]).pow(2).sum().backward()
        mine = torch.zeros(12, 5, dtype=torch.float64).index_add_(0, xs[i].reshape(-1), gs[i])
        torch.testing.assert_close(mine, reference.emb.weight.grad, rtol=0, atol=TOL)


# -- norms ---------------------------------------------------------------------------------------
class HFStyleRMSNorm(nn.Module):
    """As Llama's RMSNorm (float32 inside, `variance_epsilon`); `gemma=True` scales by 1 + γ."""

    def __init__(self, d, eps=1e-6, gemma=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + (0.0 if gemma else 1.0))
        self.variance_epsilon, self.gemma = eps, gemma

    def forward(self, x):
        h = x.to(torch.float32) if x.dtype not in (torch.float32, torch.float64) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return ((1 + self.weight) if self.gemma else self.weight) * h.to(x.dtype)


class NormStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.ln = nn.LayerNorm(D)
        self.rms = nn.RMSNorm(D)
        self.llama = HFStyleRMSNorm(D)
        self.gemma = HFStyleRMSNorm(D, gemma=True)
        self.out = nn.Linear(D, 3)
        for norm in (self.ln, self.rms):  # away from the identity, so γ and β matter
            nn.init.normal_(norm.weight, 1.0, 0.3)
        nn.init.normal_(self.ln.bias, 0.0, 0.3)

    def forward(self, x):
        h = self.ln(self.inp(x))
        h = self.rms(torch.tanh(h)) + h
        h = self.gemma(self.llama(torch.sin(h)))
        return self.out(h)


def test_layernorm_and_rmsnorm_scale_and_shift_per_sample(tmp_path):
    torch.manual_seed(1)
    model = NormStack().double()
    x = torch.randn(N, T, 6, dtype=torch.float64)  # [batch, pos, in]
    target = torch.randn(N, T, 3, dtype=torch.float64)

    def loss_fn(m):
        return (m(x) - target).pow(3).mean()

    run, grads, texts, _ = _record(tmp_path, model, loss_fn)
    kinds = {m: v["kind"] for m, v in run.manifest["factor_modules"].items()}
    assert kinds == {"inp": "linear", "ln": "layernorm", "rms": "rmsnorm", "llama": "rmsnorm",
                     "gemma": "rmsnorm", "out": "linear"}
    assert texts == []  # every trainable parameter is covered
    xs, gs = run.factors(0)["ln"]
    assert xs.shape == gs.shape == (N, D)  # per sample, summed over tokens: T times smaller
    _assert_rebuilt(run, grads, [n for n in grads])
    # brute force for sample 2: the per-sample sums are that sample's own gradients
    reference = NormStack().double()
    reference.load_state_dict(run.params(0))
    ((reference(x[2:3]) - target[2:3]).pow(3).sum() / target.numel()).backward()
    factors = run.factors(0)
    for module in ("ln", "rms", "llama", "gemma"):
        torch.testing.assert_close(factors[module][0][2], getattr(reference, module).weight.grad,
                                   rtol=0, atol=TOL)
    torch.testing.assert_close(factors["ln"][1][2], reference.ln.bias.grad, rtol=0, atol=TOL)


# -- HF GPT-2: tied LM head, position embeddings broadcast over the batch ------------------------
def gpt2(seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    return transformers.GPT2LMHeadModel(config).double()


def _lm_loss(ids):
    def loss_fn(m):  # a sum over samples of each sample's next-token loss
        logits = m(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")

    return loss_fn


def test_gpt2_tied_head_and_embeddings_rebuild_every_grad(tmp_path):
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(3))
    ids[:, 2] = ids[:, 4]  # repeated tokens in every sample
    run, grads, texts, _ = _record(tmp_path, model, _lm_loss(ids))
    assert texts == []
    meta = run.manifest["factor_modules"]
    assert meta["lm_head"]["weight"] == meta["transformer.wte"]["weight"] == "transformer.wte.weight"
    xs, gs = run.factors(0)["transformer.wpe"]  # ids [1, T] broadcast: stored per sample
    assert xs.shape == (N, T, 1) and gs.shape == (N, T, D)
    _assert_rebuilt(run, grads, list(grads))  # every param of the model, wte = embedding + head
    assert run.record(0).grad_coef_residual < 1e-12
    # brute force: sample 1's own gradient of the position and token embeddings and ln_f
    reference = gpt2()
    reference.load_state_dict(run.params(0), strict=False)
    _lm_loss(ids[1:2])(reference).backward()
    factors = run.factors(0)
    wpe = torch.zeros(16, D, dtype=torch.float64).index_add_(0, xs[1].reshape(-1), gs[1])
    torch.testing.assert_close(wpe, reference.transformer.wpe.weight.grad, rtol=0, atol=TOL)
    x_tok, g_tok = factors["transformer.wte"]
    x_head, g_head = factors["lm_head"]
    wte = torch.zeros(VOCAB, D, dtype=torch.float64).index_add_(0, x_tok[1].reshape(-1), g_tok[1])
    wte += g_head[1].T @ x_head[1]
    torch.testing.assert_close(wte, reference.transformer.wte.weight.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(factors["transformer.ln_f"][0][1],
                               reference.transformer.ln_f.weight.grad, rtol=0, atol=TOL)


# -- no silent gaps ------------------------------------------------------------------------------
def test_a_fused_lm_head_is_named_and_left_unresolved(tmp_path):
    """A trainer computing logits as F.linear(h, lm_head.weight) never calls lm_head."""
    model = gpt2()
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(4))

    def fused(m):
        hidden = m.transformer(input_ids=ids).last_hidden_state
        logits = F.linear(hidden, m.lm_head.weight)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")

    run, grads, texts, capture = _record(tmp_path, model, fused)
    named = [t for t in texts if "'lm_head'" in t]
    assert len(named) == 1 and "F.linear(h, lm_head.weight)" in named[0]
    assert capture.not_captured == {"lm_head": 1}
    assert "lm_head" not in run.factors(0)
    # the clip coefficient is fitted on the captured weights only: still exact
    assert abs(run.record(0).grad_coef - 1.0) < 1e-12
    assert run.record(0).grad_coef_residual < 1e-12
    split = C.split_update(run, 0)
    assert split.not_captured == {"transformer.wte.weight": ("lm_head",)}
    rows = C.credit_rows(run, 0, {n: torch.ones_like(v) for n, v in run.update(0).items()},
                         feature_rows="none")
    share = rows[rows["quantity"] == C.NOT_CAPTURED_SHARE]
    assert list(share["param"]) == ["transformer.wte.weight"] and list(share["site"]) == ["lm_head"]
    assert 0.5 < float(share["value"].iloc[0]) <= 1.0  # the head's part dominates the tied grad
    # features at the head's input still split every part of the tied weight (the embedding's
    # sample rows and the unresolved head part): per feature, credit sums to ⟨ΔW, R_k⟩
    update = run.update(0)["transformer.wte.weight"].double()
    gbar = torch.randn(update.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kernels = read_kernels(("f",), ("lm_head:in",), torch.eye(D, dtype=torch.float64)[:1], gbar)
    gbars = {n: gbar if n == "transformer.wte.weight" else torch.zeros_like(v)
             for n, v in run.update(0).items()}
    rows = C.credit_rows(run, 0, gbars, kernels_by_module={"lm_head": [kernels]})
    tied = rows[(rows["param"] == "transformer.wte.weight") & (rows["quantity"] == "attribution")]
    per_feature = tied[tied["feature"] != ""].groupby("feature")["value"].sum()
    for k, label in enumerate(kernels.labels):
        assert abs(per_feature[label] - float(kernels.shares(update)[k])) <= 1e-12 * float(update.norm())
    assert (tied[tied["sample"].notna()]["feature"] == "f").any()  # the embedding's sample rows
    # what was captured (the embedding's rows) is still exact for the other params
    _assert_rebuilt(run, grads, [n for n in grads if n != "transformer.wte.weight"])


def test_a_broadcast_that_cannot_be_split_is_named(tmp_path):
    """A position embedding scaled before the broadcasting add: its per-sample gradient is not
    found, so its batch-summed gradient is not stored as one sample's."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 2)

        def forward(self, ids):
            positions = torch.arange(ids.shape[1])[None]  # [1, T]
            return self.head(self.tok(ids) + 2.0 * self.pos(positions))

    torch.manual_seed(5)
    model = Scaled().double()
    ids = torch.randint(0, 9, (3, 6))
    run, grads, texts, capture = _record(tmp_path, model, lambda m: m(ids).pow(2).sum())
    assert any("'pos'" in t and "broadcast" in t for t in texts)
    assert set(run.factors(0)) == {"tok", "head"} and capture.not_captured == {"pos": 1}
    assert C.split_update(run, 0).not_captured == {"pos.weight": ("pos",)}
    _assert_rebuilt(run, grads, ["tok.weight", "head.weight", "head.bias"])


def test_multihead_attention_projections_are_excluded_and_named(tmp_path):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.mha(h, h, h)[0])

    torch.manual_seed(6)
    model = Attn().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    run, _grads, texts, capture = _record(tmp_path, model, lambda m: m(x).sum())
    assert len(texts) == 1
    assert "mha (MultiheadAttention)" in texts[0] and "inside nn.MultiheadAttention" in texts[0]
    assert "mha.out_proj" not in texts[0]  # named once, with its MHA
    assert list(capture.modules) == ["inp", "head"] and set(run.factors(0)) == {"inp", "head"}
    assert capture.not_captured == {}  # excluded up front, not a surprise at step time
    with pytest.raises(chisel.UnknownModuleError, match="inside nn.MultiheadAttention"):
        chisel.record(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "x",
                      factors=["mha.out_proj"])


def test_unsupported_modules_are_named_with_the_reason(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.freq = nn.Embedding(9, 4, scale_grad_by_freq=True)
            self.gain = nn.Parameter(torch.ones(4))  # a raw parameter of the model itself
            self.bad = WeirdRMSNorm(4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.bad(self.freq(ids) * self.gain))

    class WeirdRMSNorm(nn.Module):  # looks like an RMSNorm, computes something else
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d) * 1.5), 1e-6

        def forward(self, x):
            return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)

    torch.manual_seed(7)
    model = Odd().double()
    ids = torch.randint(0, 9, (3, 5))
    run, _grads, texts, _capture = _record(tmp_path, model, lambda m: m(ids).pow(2).sum())
    start = next(t for t in texts if t.startswith("factors=True"))
    assert "<model> (Odd)" in start and "freq (Embedding, scale_grad_by_freq" in start
    assert any("'bad'" in t and "not (γ or 1 + γ)" in t for t in texts)  # checked on first call
    assert set(run.factors(0)) == {"head"}
    assert "bad.weight" in C.split_update(run, 0).not_captured
    with pytest.raises(chisel.UnknownModuleError, match="with scale_grad_by_freq"):
        chisel.record(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "x",
                      factors=["freq"])


def test_transformer_lens_bridge_norms_are_taken_at_the_bridge(tmp_path):
    """A TL bridge's NormalizationBridge computes the norm itself with the wrapped LayerNorm's
    weights and never calls it: chisel takes the bridge's factors, and every grad is rebuilt."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(8)
    config = TransformerBridgeConfig(d_model=D, d_head=8, n_heads=2, n_layers=1, n_ctx=8,
                                     d_vocab=11, act_fn="gelu")
    model = TransformerBridge.boot_native(config).double()
    ids = torch.randint(0, 11, (N, 6), generator=torch.Generator().manual_seed(9))
    run, grads, texts, capture = _record(tmp_path, model, lambda m: m(ids).pow(2).mean())
    assert texts == [] and capture.not_captured == {}
    norms = {m for m, v in run.manifest["factor_modules"].items() if v["kind"] == "layernorm"}
    assert norms == {"blocks.0._original_component.ln1", "blocks.0._original_component.ln2", "ln_final"}
    _assert_rebuilt(run, grads, list(grads))


def test_hugging_face_llama_rmsnorm_and_tied_embeddings(tmp_path):
    """LlamaRMSNorm (found by duck type) normalises in float32 whatever the input's dtype: the
    first-call check finds that, and the scale's factors are exact for a float64 model too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    config = transformers.LlamaConfig(
        hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(11))
    run, grads, texts, capture = _record(tmp_path, model, _lm_loss(ids))
    assert texts == [] and capture.not_captured == {}
    kinds = {m: v["kind"] for m, v in run.manifest["factor_modules"].items() if v["kind"] != "linear"}
    assert kinds == {"model.embed_tokens": "embedding", "model.layers.0.input_layernorm": "rmsnorm",
                     "model.layers.0.post_attention_layernorm": "rmsnorm", "model.norm": "rmsnorm"}
    _assert_rebuilt(run, grads, list(grads))
