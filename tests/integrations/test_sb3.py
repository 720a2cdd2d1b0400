"""Stable-Baselines3: real PPO and A2C on CartPole, every gradient step recorded exactly, every
consumed sample tagged with its own rollout-buffer values, a target_kl early stop, credit rows
carrying the tags, the policy metrics in float32 and float64, and clean detaching."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import chisel
from chisel.attribution.copying import private_copy
from chisel.integrations import sb3
from tests.chisel.helpers import module_hook_count, optimizer_hook_count

N_ENVS, N_STEPS = 2, 32


class SpyBuffer(RolloutBuffer):
    """Logs, independently of chisel, each rollout's arrays and each minibatch handed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rollouts: list[dict[str, np.ndarray]] = []
        self.batches: list[tuple[int, np.ndarray, torch.Tensor]] = []  # (rollout, indices, adv)

    def compute_returns_and_advantage(self, last_values, dones) -> None:
        super().compute_returns_and_advantage(last_values, dones)
        names = ("advantages", "returns", "values", "log_probs", "rewards", "episode_starts")
        self.rollouts.append({n: getattr(self, n).copy() for n in names})

    def _get_samples(self, batch_inds, env=None):
        samples = super()._get_samples(batch_inds, env)
        self.batches.append((len(self.rollouts) - 1, np.array(batch_inds), samples.advantages.clone()))
        return samples


class StepSpy:
    """The Δθ of every optimizer step, and the minibatch it consumed (the last one handed out)."""

    def __init__(self, model) -> None:
        self.model, self.steps = model, []
        opt = model.policy.optimizer
        self.handles = [opt.register_step_pre_hook(self.pre), opt.register_step_post_hook(self.post)]

    def pre(self, *_) -> None:
        self.before = _snapshot(self.model.policy)
        self.batch = len(self.model.rollout_buffer.batches) - 1

    def post(self, *_) -> None:
        after = _snapshot(self.model.policy)
        self.steps.append((self.batch, {n: after[n].double() - self.before[n].double() for n in after}))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _snapshot(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters()}


def _flat(a: np.ndarray) -> np.ndarray:
    """[steps, envs] → the env-major order of RolloutBuffer.get."""
    return a.reshape(N_STEPS, N_ENVS).swapaxes(0, 1).reshape(-1)


def _model(algo, **kwargs):
    env = make_vec_env("CartPole-v1", n_envs=N_ENVS, seed=0)
    return algo("MlpPolicy", env, n_steps=N_STEPS, seed=0, device="cpu",
                rollout_buffer_class=SpyBuffer, policy_kwargs={"net_arch": [16]}, **kwargs)


def _train(algo, run_dir, timesteps, **kwargs):
    model = _model(algo, **kwargs)
    spy, initial = StepSpy(model), _snapshot(model.policy)
    callback = sb3.ChiselCallback(run_dir, factors=True, keyframe_every=25)
    model.learn(timesteps, callback=callback)
    return model, spy, initial, callback


@pytest.fixture(scope="module")
def ppo(tmp_path_factory):
    """PPO: 32 rollouts of 2 x 32 steps, 2 epochs of 2 minibatches of 32 → 128 steps."""
    run_dir = tmp_path_factory.mktemp("sb3") / "ppo"
    model, spy, initial, callback = _train(PPO, run_dir, 2048, batch_size=32, n_epochs=2)
    return model, spy, initial, callback, chisel.load(run_dir)


def _assert_exact(run, initial, final, spy_steps) -> None:
    assert len(run) == len(spy_steps)
    assert all(torch.equal(run.params(0)[n], initial[n]) for n in initial)
    assert all(torch.equal(run.params(len(run))[n], final[n]) for n in final)
    total = {n: initial[n].double() for n in initial}
    for t, (_, observed) in enumerate(spy_steps):
        update = run.update(t)
        for n in observed:
            assert torch.equal(update[n], observed[n]), f"step {t} param {n}"
            total[n] = total[n] + update[n]
    # the recorded updates telescope to the final weights bit for bit
    assert all(torch.equal(total[n], final[n].double()) for n in final)


def _assert_tags_aligned(run, model, spy_steps, batch_size: int, normalised: bool) -> None:
    buf = model.rollout_buffer
    for t, (b, _) in enumerate(spy_steps):
        r, idx, adv = buf.batches[b]
        tags, rollout = run.tags(t), buf.rollouts[r]
        assert {k: len(v) for k, v in tags.items()} == dict.fromkeys(sb3.SAMPLE_TAGS, batch_size)
        assert torch.equal(tags["advantage"], adv)
        for tag, name in (("advantage", "advantages"), ("return", "returns"), ("value", "values"),
                          ("log_prob", "log_probs"), ("reward", "rewards")):
            np.testing.assert_array_equal(tags[tag].numpy(), _flat(rollout[name])[idx], err_msg=tag)
        expected = (adv - adv.mean()) / (adv.std() + 1e-8) if normalised else adv
        assert torch.equal(tags["advantage_used"], expected)
        env, step_in_rollout = idx // N_STEPS, idx % N_STEPS
        assert torch.equal(tags["env"], torch.from_numpy(env))
        timestep = r * N_STEPS * N_ENVS + step_in_rollout * N_ENVS + env
        assert torch.equal(tags["timestep"], torch.from_numpy(timestep))
        # one factor row per tagged sample, in the same order
        assert {m: x.shape[0] for m, (x, _) in run.factors(t).items()} == dict.fromkeys(
            run.factors(t), batch_size)


def _assert_episode_ids(run, model) -> None:
    """Episode ids change exactly where the buffer says an episode starts, also across rollouts."""
    ids: dict[int, int] = {}
    for t in range(len(run)):
        tags = run.tags(t)
        for ts, ep in zip(tags["timestep"].tolist(), tags["episode"].tolist()):
            assert ids.setdefault(ts, ep) == ep
    starts = np.concatenate([r["episode_starts"] for r in model.rollout_buffer.rollouts])  # [T, E]
    grid = np.array([[ids[t * N_ENVS + e] for e in range(N_ENVS)] for t in range(len(starts))])
    changed = grid[1:] != grid[:-1]
    np.testing.assert_array_equal(changed, starts[1:].astype(bool))
    assert len(set(grid[0])) == N_ENVS and grid.min() == 0
    for e in range(N_ENVS):  # an episode never continues in another env
        others = np.delete(grid, e, axis=1)
        assert not np.isin(grid[:, e], others).any()


def test_ppo_every_step_recorded_exactly(ppo):
    model, spy, initial, _, run = ppo
    assert len(run) == 128
    _assert_exact(run, initial, _snapshot(model.policy), spy.steps)


def test_ppo_tags_are_the_consumed_samples(ppo):
    model, spy, _, _, run = ppo
    _assert_tags_aligned(run, model, spy.steps, batch_size=32, normalised=True)
    _assert_episode_ids(run, model)
    meta = run.manifest["metadata"]
    assert meta["algorithm"] == "PPO" and meta["sample_tags"] == list(sb3.SAMPLE_TAGS)


def test_ppo_detaches_everything(ppo):
    model, _, _, callback, _ = ppo
    assert optimizer_hook_count(model.policy.optimizer) == 2  # the spy's own two
    assert module_hook_count(model.policy) == 0
    assert "_get_samples" not in vars(model.rollout_buffer)
    assert "train" not in vars(model) and "collect_rollouts" not in vars(model)
    assert callback.recorder is None and "not recording" in repr(callback)


def test_credit_rows_carry_the_tags(ppo):
    model, _, _, _, run = ppo
    rollout = model.rollout_buffer
    obs, actions = rollout.observations[:64], rollout.actions[:64, 0]
    steps = [len(run) - 2, len(run) - 1]
    ledger = chisel.attribute(run, model.policy, None, sb3.logprob(obs, actions), steps=steps,
                              families=("credit",), progress=False)
    per_sample = ledger[ledger["sample"].notna()]
    assert set(per_sample["step"]) == set(steps) and set(per_sample["part"]) >= {"gradient"}
    tag_columns = [f"tag/{name}" for name in sb3.SAMPLE_TAGS]
    assert not per_sample[tag_columns].isna().any().any()
    origin = np.where(per_sample["part"] == "gradient", per_sample["step"], per_sample["origin_step"])
    keys = per_sample.assign(origin=origin.astype(int), i=per_sample["sample"].astype(int))
    keys = keys.drop_duplicates(["origin", "i"])
    tags = {s: run.tags(s) for s in set(keys["origin"])}
    for name in ("advantage", "episode", "reward"):
        expected = [float(tags[o][name][i]) for o, i in zip(keys["origin"], keys["i"])]
        np.testing.assert_array_equal(keys[f"tag/{name}"].to_numpy(), expected, err_msg=name)


def test_target_kl_early_stop_leaves_no_tags(tmp_path):
    model, spy, initial, _ = _train(PPO, tmp_path / "kl", 1024, batch_size=32, n_epochs=4,
                                    target_kl=0.0005, learning_rate=3e-3)
    run = chisel.load(tmp_path / "kl")
    consumed = {b for b, _ in spy.steps}
    abandoned = set(range(len(model.rollout_buffer.batches))) - consumed
    assert abandoned and len(run) == len(spy.steps) > 0  # early stops happened, steps too
    _assert_exact(run, initial, _snapshot(model.policy), spy.steps)
    _assert_tags_aligned(run, model, spy.steps, batch_size=32, normalised=True)
    assert sum(len(run.tags(t)["advantage"]) for t in range(len(run))) == 32 * len(run)


def test_a2c_recorded_exactly_and_a_second_learn_resumes(tmp_path):
    model, spy, initial, callback = _train(A2C, tmp_path / "a2c", 512)
    assert len(chisel.load(tmp_path / "a2c")) == 8  # 512 / (2 envs x 32 steps), one step each
    model.learn(512, callback=callback, reset_num_timesteps=False)
    run = chisel.load(tmp_path / "a2c")
    assert len(run) == 16 and isinstance(model.policy.optimizer, torch.optim.RMSprop)
    _assert_exact(run, initial, _snapshot(model.policy), spy.steps)
    _assert_tags_aligned(run, model, spy.steps, batch_size=N_STEPS * N_ENVS, normalised=False)
    _assert_episode_ids(run, model)


def test_an_error_inside_learn_still_detaches(tmp_path):
    class Boom(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            if self.model.num_timesteps >= 3 * N_STEPS * N_ENVS:
                raise RuntimeError("boom")

    model = _model(PPO, batch_size=32, n_epochs=1)
    callback = sb3.ChiselCallback(tmp_path / "boom")
    with pytest.raises(RuntimeError, match="boom"):
        model.learn(4096, callback=[callback, Boom()])
    assert optimizer_hook_count(model.policy.optimizer) == 0
    assert "_get_samples" not in vars(model.rollout_buffer) and "train" not in vars(model)
    run = chisel.load(tmp_path / "boom")
    assert len(run) == 4 and all(len(run.tags(t)["advantage"]) == 32 for t in range(len(run)))


def test_refusals(tmp_path):
    with pytest.raises(TypeError, match="unknown record options"):
        sb3.ChiselCallback(tmp_path / "x", factor=True)
    with pytest.raises(sb3.IntegrationError, match="not sample tags"):
        sb3.ChiselCallback(tmp_path / "x", tags=["advantages"])
    dqn = DQN("MlpPolicy", "CartPole-v1", device="cpu", learning_starts=0)
    with pytest.raises(sb3.IntegrationError, match="on-policy"):
        dqn.learn(10, callback=sb3.ChiselCallback(tmp_path / "dqn"))
    assert not (tmp_path / "dqn").exists()


def test_policy_metrics_in_float32_and_float64(ppo):
    model, *_ = ppo
    policy, buf = model.policy, model.rollout_buffer
    obs, actions = torch.as_tensor(buf.observations[:48]), torch.as_tensor(buf.actions[:48, 0])
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(obs, actions.long())
        lp = sb3.policy_logprob(policy, obs, actions)
        logits = sb3.action_logits(policy, obs)
        dist_logits = policy.get_distribution(obs).distribution.logits
    assert torch.equal(lp, log_prob)  # SB3's own numbers, bit for bit
    torch.testing.assert_close(torch.log_softmax(logits, -1), dist_logits)
    assert torch.equal(sb3.value(obs)(policy).detach(), values.mean())
    double = private_copy(policy).double()  # what chisel.attribute evaluates
    lp64 = sb3.logprob(obs, actions)(double)
    assert lp64.dtype == torch.float64
    torch.testing.assert_close(lp64, log_prob.double().mean(), rtol=0, atol=1e-5)
    metric = chisel.metrics.action_logit(obs, 1, logits=sb3.action_logits)
    assert metric(double).dtype == torch.float64
    with pytest.raises(sb3.IntegrationError, match="Pass `model.policy`"):
        sb3.policy_logprob(model, obs, actions)


def test_import_chisel_does_not_import_sb3_or_register_envs():  # and sb3 missing is named
    code = (
        "import sys, chisel, gymnasium\n"
        "bad = [m for m in sys.modules if m.startswith(('stable_baselines3', 'chisel.integrations'))]\n"
        "assert not bad, bad\n"
        "assert 'chisel/TrashWorld-v0' not in gymnasium.registry\n"
        # without SB3 installed, the integration names the extra to install
        "sys.modules['stable_baselines3'] = None\n"
        "try:\n"
        "    import chisel.integrations.sb3\n"
        "except ImportError as err:\n"
        "    assert \"pip install 'chisel-rl[sb3]'\" in str(err), err\n"
        "else:\n"
        "    raise AssertionError('imported without SB3')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ppo_on_registered_trashworld(tmp_path):
    import chisel.envs

    env = make_vec_env(chisel.envs.register(), n_envs=2, seed=0, env_kwargs={"button": "early"})
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(128, callback=sb3.ChiselCallback(tmp_path / "tw"))
    run = chisel.load(tmp_path / "tw")
    assert len(run) == 4 and run.manifest["metadata"]["observation_space"].startswith("Box(")
    assert all(len(run.tags(t)["reward"]) == 32 for t in range(len(run)))


def test_rollout_tags_match_a_loop_and_survive_an_earlier_get():
    from gymnasium import spaces

    from chisel.integrations._sb3_tags import EpisodeCounter, rollout_tags

    rng = np.random.default_rng(0)
    steps, n_envs = 7, 3
    buf = RolloutBuffer(steps, spaces.Box(-1, 1, (2,)), spaces.Discrete(2), n_envs=n_envs)
    starts = rng.random((steps, n_envs)) < 0.3
    for t in range(steps):
        buf.add(rng.random((n_envs, 2)), rng.integers(0, 2, n_envs), rng.random(n_envs),
                starts[t], torch.as_tensor(rng.random(n_envs)), torch.as_tensor(rng.random(n_envs)))
    buf.compute_returns_and_advantage(torch.as_tensor(rng.random(n_envs)), np.zeros(n_envs))
    counter = EpisodeCounter(next_id=5, of_env=np.array([0, 1, -1]))
    before = rollout_tags(buf, [], 100, copy.deepcopy(counter))
    next(buf.get(4))  # flattens the buffer's arrays in place
    after = rollout_tags(buf, [], 100, counter)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # a loop over steps and envs gives the same ids, envs, timesteps
    running, next_id, expected = [0, 1, None], 5, np.zeros((steps, n_envs), int)
    for t in range(steps):
        for e in range(n_envs):
            if starts[t, e] or running[e] is None:
                running[e], next_id = next_id, next_id + 1
            expected[t, e] = running[e]
    flat = lambda a: a.swapaxes(0, 1).reshape(-1)  # noqa: E731
    np.testing.assert_array_equal(after["episode"], flat(expected))
    np.testing.assert_array_equal(after["env"], flat(np.tile(np.arange(n_envs), (steps, 1))))
    np.testing.assert_array_equal(after["timestep"], 100 + np.arange(steps * n_envs).reshape(steps, n_envs).swapaxes(0, 1).reshape(-1))
    np.testing.assert_array_equal(after["reward"], flat(buf.rewards))
    assert counter.next_id == next_id and list(counter.of_env) == running
