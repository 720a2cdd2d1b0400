"""Hugging Face: a real `transformers.Trainer` with gradient accumulation and a real TRL
`GRPOTrainer` on a tiny random GPT-2 with an in-process tokenizer (CPU, offline): every optimizer
step recorded exactly, GRPO's per-completion advantages and rewards tagged in the order the loss
consumed them, hooks gone afterwards and after an error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback

import chisel
from chisel.integrations import hf
from chisel.integrations.optimizers import unwrap_optimizer
from tests.chisel.helpers import module_hook_count, optimizer_hook_count, snapshot

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _model(tokenizer, n_layer: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=n_layer, n_head=2, vocab_size=len(tokenizer), n_positions=32,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)


class StepSpy(TrainerCallback):
    """Independently of chisel: θ at the start, and the Δθ of every real optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.handles: list = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model, self.initial = model, snapshot(model)
        inner = unwrap_optimizer(optimizer)
        self.handles = [inner.register_step_pre_hook(self.pre), inner.register_step_post_hook(self.post)]
        self.optimizer = inner

    def pre(self, *_) -> None:
        self.before = snapshot(self.model)

    def post(self, *_) -> None:
        after = snapshot(self.model)
        self.steps.append({n: after[n].double() - self.before[n].double() for n in after})


def _chisel_hooks(model) -> list:
    """The module hooks chisel's code registered (TRL and transformers keep their own)."""
    found = []
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            for fn in getattr(m, attr, {}).values():
                fn = getattr(fn, "func", fn)  # functools.partial
                if getattr(fn, "__module__", "").startswith("chisel"):
                    found.append((type(m).__name__, attr, fn))
    return found


def _assert_exact(run, spy, model) -> None:
    final = snapshot(model)
    assert len(run) == len(spy.steps) > 0
    assert set(run.params(0)) == set(spy.initial)
    assert all(torch.equal(run.params(0)[n], spy.initial[n]) for n in spy.initial)
    total = {n: spy.initial[n].double() for n in spy.initial}
    for t, observed in enumerate(spy.steps):
        update = run.update(t)
        for n in observed:
            assert torch.equal(update[n], observed[n]), f"step {t} param {n}"
            total[n] = total[n] + update[n]
    # the recorded updates telescope to the final weights bit for bit
    assert all(torch.equal(total[n], final[n].double()) for n in final)
    assert all(torch.equal(run.params(len(run))[n], final[n]) for n in final)


def _args(cls, tmp_path, **kwargs):
    return cls(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
               save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True, **kwargs)


class LmData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 2 + len(WORDS), (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_gradient_accumulation_records_every_real_step(tmp_path):
    tokenizer = _tokenizer()
    model, spy = _model(tokenizer), StepSpy()
    callback = hf.ChiselCallback(tmp_path / "run", factors=True)
    args = _args(transformers.TrainingArguments, tmp_path, per_device_train_batch_size=2,
                 gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=LmData(),
                                   callbacks=[spy, callback])
    trainer.train()
    run = chisel.load(tmp_path / "run")
    assert len(run) == 3  # 6 micro-batches, accumulated in pairs
    _assert_exact(run, spy, model)
    assert run.manifest["metadata"]["trainer"] == "Trainer"
    assert run.manifest["metadata"]["hyperparameters"]["gradient_accumulation_steps"] == 2
    # factors of both micro-batches of each step: 2 x 2 sequences
    assert {x.shape[0] for x, _ in run.factors(0).values()} <= {4, 4 * 8}
    assert callback.recorder is None and module_hook_count(model) == 0
    assert optimizer_hook_count(spy.optimizer) == 2  # the spy's own
    step = vars(trainer.optimizer).get("step")  # the LR scheduler's wrapper, not chisel's guard
    assert step is None or step.__qualname__.split(".")[0] != "ChiselCallback"


def _reward_count_a(completions, **kwargs) -> list[float]:
    return [float(c.split().count("a")) for c in completions]


def _reward_length(completions, **kwargs) -> list[float]:
    return [0.1 * len(c.split()) for c in completions]


class LossSpy:
    """Logs, independently of chisel, each micro-batch the GRPO loss consumed."""

    def __init__(self, trainer, tokenizer) -> None:
        self.batches: list[tuple[int, torch.Tensor, list[str]]] = []  # (step, advantages, texts)
        self.trainer, self.tokenizer, self.spy = trainer, tokenizer, None
        original = trainer._compute_loss

        def logged(model, inputs):
            if torch.is_grad_enabled():
                texts = tokenizer.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
                self.batches.append((len(self.spy.steps), inputs["advantages"].clone(), texts))
            return original(model, inputs)

        trainer._compute_loss = logged


def _grpo(tmp_path, callback, max_steps=3):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = _tokenizer()
    model, spy = _model(tokenizer), StepSpy()
    prompts = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"] * 4})
    args = _args(GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                 gradient_accumulation_steps=2, max_completion_length=6, max_steps=max_steps,
                 learning_rate=1e-2, temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[_reward_count_a, _reward_length], args=args,
                          train_dataset=prompts, processing_class=tokenizer,
                          callbacks=[spy, callback])
    losses = LossSpy(trainer, tokenizer)
    losses.spy = spy
    return trainer, model, spy, losses


def test_grpo_records_every_step_and_tags_each_completion(tmp_path):
    callback = hf.ChiselCallback(tmp_path / "run", factors=True)
    trainer, model, spy, losses = _grpo(tmp_path, callback)
    trainer.train()
    run = chisel.load(tmp_path / "run")
    assert len(run) == 3
    _assert_exact(run, spy, model)
    meta = run.manifest["metadata"]
    assert meta["trainer"] == "GRPOTrainer"
    assert meta["sample_tags"] == ["advantage", "reward", "group", "reward__reward_count_a",
                                   "reward__reward_length"]
    for t in range(len(run)):
        tags = run.tags(t)
        mine = [b for b in losses.batches if b[0] == t]
        assert len(mine) == 2  # two micro-batches of 4 completions per optimizer step
        advantages = torch.cat([b[1] for b in mine])
        texts = [s for b in mine for s in b[2]]
        assert {k: len(v) for k, v in tags.items()} == dict.fromkeys(meta["sample_tags"], 8)
        assert torch.equal(tags["advantage"], advantages.float())
        # each completion's rewards are its own (recomputed from the text the loss consumed)
        count_a = torch.tensor(_reward_count_a(texts))
        length = torch.tensor(_reward_length(texts))
        assert torch.equal(tags["reward__reward_count_a"], count_a)
        assert torch.allclose(tags["reward__reward_length"], length)
        assert torch.allclose(tags["reward"], count_a + length)
        # a step holds whole groups here (one generation batch per step): GRPO's advantage is
        # the reward centred and scaled within its group
        groups = tags["group"]
        assert sorted(torch.bincount(groups - groups.min()).tolist()) == [0] * 0 + [4, 4]
        for g in groups.unique():
            r = tags["reward"][groups == g]
            expected = (r - r.mean()) / (r.std() + 1e-4)
            assert torch.allclose(tags["advantage"][groups == g], expected, atol=1e-5)
    assert sorted(set(run.tags(0)["group"].tolist())) == [0, 1]
    assert sorted(set(run.tags(2)["group"].tolist())) == [4, 5]
    assert callback.recorder is None and _chisel_hooks(model) == []
    assert "compute_loss" not in vars(trainer) and "training_step" not in vars(trainer)
    # credit rows (this step's samples and, through Adam's momentum, earlier steps') carry the tags
    model.eval()  # the Trainer leaves dropout on
    ids = torch.tensor([[2, 3, 4, 5, 2, 2]])

    def metric(m):  # mean log-prob of a fixed sequence
        logp = torch.log_softmax(m(ids).logits[:, :-1], -1)
        return logp.gather(-1, ids[:, 1:, None]).mean()

    ledger = chisel.attribute(run, model, None, metric, steps=[2], families=("credit",), progress=False)
    rows = ledger[ledger["sample"].notna()]
    assert set(rows["part"]) >= {"gradient", "momentum"} and set(rows["origin_step"]) == {0, 1, 2}
    origin = rows["origin_step"].astype(int).to_numpy()
    for name in meta["sample_tags"]:
        expected = [float(run.tags(o)[name][int(i)]) for o, i in zip(origin, rows["sample"])]
        assert rows[f"tag/{name}"].tolist() == pytest.approx(expected, abs=0), name


def test_rloo_completions_are_tagged_too(tmp_path):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = _tokenizer()
    model, spy = _model(tokenizer), StepSpy()
    callback = hf.ChiselCallback(tmp_path / "run")
    args = _args(RLOOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                 gradient_accumulation_steps=2, max_completion_length=6, max_steps=2,
                 learning_rate=1e-2, beta=0.0)  # beta > 0 loads a reference model from the Hub
    trainer = RLOOTrainer(model=model, reward_funcs=[_reward_count_a], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"] * 8}),
                          processing_class=tokenizer, callbacks=[spy, callback])
    losses = LossSpy(trainer, tokenizer)
    losses.spy = spy
    trainer.train()
    run = chisel.load(tmp_path / "run")
    _assert_exact(run, spy, model)
    for t in range(len(run)):
        mine = [b for b in losses.batches if b[0] == t]
        tags = run.tags(t)
        assert torch.equal(tags["advantage"], torch.cat([b[1] for b in mine]).float())
        texts = [s for b in mine for s in b[2]]
        assert torch.equal(tags["reward"], torch.tensor(_reward_count_a(texts)))


def test_grpo_error_closes_the_recording(tmp_path):
    callback = hf.ChiselCallback(tmp_path / "run")
    trainer, model, spy, _ = _grpo(tmp_path, callback, max_steps=3)
    calls = []

    def failing(completions, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("reward server down")
        return [0.0] * len(completions)

    trainer.reward_funcs[1] = failing
    with pytest.raises(RuntimeError, match="reward server down"):
        trainer.train()
    assert callback.recorder is None and _chisel_hooks(model) == []
    assert optimizer_hook_count(spy.optimizer) == 2  # the spy's own
    assert "training_step" not in vars(trainer) and "_generate_and_score_completions" not in vars(trainer)
    assert len(chisel.load(tmp_path / "run")) == 1


def test_unknown_option_and_no_import_cost():
    with pytest.raises(TypeError, match="unknown record options \\['factor'\\]"):
        hf.ChiselCallback("runs/x", factor=True)
    code = ("import sys, chisel; bad = [m for m in ('transformers', 'trl', 'chisel.integrations') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
