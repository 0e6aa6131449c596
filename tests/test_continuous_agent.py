"""Continuous actions end to end through the models, replay and warm-up (Meta-World's
Box(-1, 1, (4,))): the token mixer's linear action input, STORM and MoW world models,
the tanh-Gaussian actor of both agents, float replay, random warm-up actions, and the
per-suite parameter block. No env is built here (see test_envs_metaworld.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mow.config import ConfigError, load_params
from mow.envs import action_spec, shared_action_spec
from mow.models.actor_critic import ActorCritic, AgentConfig, MultiTaskActorCritic
from mow.models.continuous import TanhGaussian
from mow.models.mow_world_model import MoWConfig, MoWWorldModel
from mow.models.transformer import TokenMixer
from mow.models.world_model import WorldModel
from mow.policy import ContextWindow
from mow.replay import ReplayBuffer
from mow.warmup import random_legal_actions

from conftest import PARAMS
from test_mow_models import TINY_WORLD

A = 4  # Meta-World's action dimension
WORLD = TINY_WORLD
MOW = MoWConfig(
    world=WORLD, num_tasks=3, num_clusters=2, num_experts=3, top_k=2, task_embed_dim=8,
    router_hidden=16, expert_d_model=16, expert_layers=1, expert_heads=2, expert_ffn=24,
    shared_d_model=24, shared_layers=1, shared_heads=2, shared_ffn=32,
)  # fmt: skip
AGENT = AgentConfig(hidden=16, layers=1, value_bins=15)


def batch(size: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (size, steps, 16, 16, 3), dtype=torch.uint8, generator=g)
    actions = torch.rand(size, steps, A, generator=g) * 2 - 1
    rewards = torch.randn(size, steps, generator=g)
    terminations = (torch.rand(size, steps, generator=g) < 0.1).float()
    return obs, actions, rewards, terminations


def test_token_mixer_feeds_the_action_vector_through_one_linear_map():
    torch.manual_seed(0)
    mixer = TokenMixer(latent_dim=6, num_actions=A, d_model=8, cond_dim=3, continuous=True)
    assert not hasattr(mixer, "action_embed")
    z, a, e = torch.randn(2, 5, 6), torch.rand(2, 5, A) * 2 - 1, torch.randn(2, 5, 3)
    # Linear(z ⊕ a ⊕ e) written out with the two weight blocks
    w_z = mixer.latent_proj.weight  # [d, 6 + 3]
    first = torch.cat([z, e], -1) @ w_z.T + a @ mixer.action_proj.weight.T
    torch.testing.assert_close(mixer(z, a, e), mixer.body(first))
    bound = 1 / math.sqrt(6 + A + 3)  # the one-hot mixer's initialisation, fan-in of the concat
    assert mixer.action_proj.weight.abs().max() <= bound and mixer.action_proj.bias is None
    # a different action gives a different token: the action really enters
    assert not torch.allclose(mixer(z, a, e), mixer(z, -a, e))


def test_storm_world_model_and_actor_train_and_imagine_with_continuous_actions():
    torch.manual_seed(0)
    wm = WorldModel(WORLD, A, continuous=True)
    ac = ActorCritic(AGENT, wm.state_dim, A, continuous=True)
    obs, actions, rewards, terms = batch(3, 6)
    loss, _ = wm.compute_loss(obs, actions, rewards, terms)
    loss.backward()
    assert torch.isfinite(loss) and wm.mixer.action_proj.weight.grad.abs().sum() > 0

    imag = wm.imagine(lambda s: ac.act(s), obs[:, :3], actions[:, :3], horizon=5)
    assert imag.actions.shape == (3, 5, A) and imag.actions.dtype == torch.float32
    assert imag.actions.abs().max() <= 1.0 and imag.states.shape == (3, 6, wm.state_dim)
    state = wm.act_state(obs[:, :3], actions[:, :3])
    assert ac.act(state).shape == (3, A)

    loss, metrics = ac.compute_loss(imag)
    loss.backward()
    head = ac.actor[-1].linear.weight.grad
    assert torch.isfinite(loss) and head is not None and head.abs().sum() > 0
    assert math.isfinite(float(metrics["ac/entropy"]))


def test_continuous_actor_is_a_bounded_tanh_gaussian_with_its_density():
    torch.manual_seed(0)
    ac = ActorCritic(AGENT, 10, A, continuous=True)
    states = torch.randn(4096, 10) * 3
    dist = ac.policy(states)
    assert isinstance(dist, TanhGaussian)
    actions = ac.act(states)
    assert actions.shape == (4096, A) and actions.abs().max() <= 1.0
    torch.testing.assert_close(ac.act(states, greedy=True), torch.tanh(dist.mean))
    # the log-density the policy gradient uses is the change-of-variables one
    a, few = actions[:3], ac.policy(states[:3])
    u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    normal = torch.distributions.Normal(few.mean, few.std)
    expected = (normal.log_prob(u) - torch.log1p(-torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(few.log_prob(a), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no action mask"):
        ac.policy(states, torch.ones(A, dtype=torch.bool))


def test_mow_world_model_and_shared_continuous_actor():
    torch.manual_seed(0)
    wm = MoWWorldModel(MOW, A, continuous=True)
    wm.set_clusters([0, 1, 1])
    ac = MultiTaskActorCritic(AGENT, wm.state_dim, A, None, 2, continuous=True, num_tasks=3)
    ac.set_clusters([0, 1, 1])
    assert ac.action_masks is None and "action_masks" not in ac.state_dict()
    obs, actions, rewards, terms = batch(6, 5)
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = wm.compute_loss(obs, actions, rewards, terms, task_ids)
    loss.backward()
    mixers = [e.mixer.action_proj.weight.grad for e in wm.experts]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in mixers)

    imag = wm.imagine(lambda s: ac.act(s, task_ids), obs[:, :2], actions[:, :2], task_ids, horizon=4)
    assert imag.actions.shape == (6, 4, A) and imag.actions.abs().max() <= 1.0
    loss, _ = ac.compute_loss(imag, task_ids)
    loss.backward()
    assert torch.isfinite(loss) and ac.actor[-1].linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_tasks"):
        MultiTaskActorCritic(AGENT, wm.state_dim, A, None, 2, continuous=True)


def test_replay_and_context_hold_float_action_vectors():
    replay = ReplayBuffer(40, 2, (4, 4, 3), seed=0, action_dim=A)
    rng = np.random.default_rng(0)
    stored = []
    for _ in range(10):
        acts = rng.uniform(-1, 1, (2, A)).astype(np.float32)
        stored.append(acts)
        replay.add(np.zeros((2, 4, 4, 3), np.uint8), acts, np.zeros(2), np.zeros(2))
    sample = replay.sample(3, 4, torch.tensor([0, 1, 1]))
    assert sample.actions.shape == (3, 4, A) and sample.actions.dtype == torch.float32
    stored = np.stack(stored)  # [10, 2, A]
    for row, stream in enumerate([0, 1, 1]):  # each sampled sequence is a run of stored actions
        seq = sample.actions[row].numpy()
        starts = [t for t in range(7) if np.array_equal(stored[t:t + 4, stream], seq)]
        assert starts, "sampled actions are not a stored sequence"
    _, ctx_actions = replay.recent_context(3)
    np.testing.assert_array_equal(ctx_actions.numpy(), stored[-3:].transpose(1, 0, 2))

    copy = ReplayBuffer(40, 2, (4, 4, 3), seed=5, action_dim=A)
    copy.load_state_dict(replay.state_dict())
    torch.testing.assert_close(copy.actions, replay.actions)
    with pytest.raises(ValueError, match="action_dim"):
        ReplayBuffer(40, 2, (4, 4, 3)).load_state_dict(replay.state_dict())

    context = ContextWindow(2, 3, (4, 4, 3), torch.device("cpu"), action_dim=A)
    context.push(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.from_numpy(stored[0]))
    np.testing.assert_array_equal(context.view()[1][:, -1].numpy(), stored[0])


def test_random_warmup_actions_of_a_continuous_suite_are_uniform_in_the_box():
    rng = np.random.default_rng(0)
    acts = np.concatenate([random_legal_actions(rng, None, np.array([0, 1, 2]), A) for _ in range(400)])
    assert acts.shape == (1200, A) and acts.dtype == np.float32
    assert acts.min() >= -1 and acts.max() <= 1
    assert np.allclose(acts.mean(0), 0, atol=0.06) and np.allclose(acts.var(0), 1 / 3, atol=0.03)


def test_action_specs_and_the_suite_parameter_block():
    import gymnasium

    assert action_spec(gymnasium.spaces.Discrete(6)) == (6, False)
    assert action_spec(gymnasium.spaces.Box(-1, 1, (4,))) == (4, True)
    assert shared_action_spec("metaworld", ["reach-v3", "push-v3"]) == (4, True)
    assert shared_action_spec("atari", ["Pong"]) == (18, False)
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach-v9'"):
        shared_action_spec("metaworld", ["reach-v9"])

    paper = load_params(PARAMS, scale="paper", suite="metaworld")
    assert len(paper.tasks("metaworld")) == 50 and paper["train"]["env_steps"] == 300_000
    assert dict(paper.protocol("metaworld_mt50"))["episode_steps"] == 500
    assert load_params(PARAMS, scale="paper", suite="atari")["train"]["env_steps"] == 102_000
    smoke = load_params(PARAMS, suite="metaworld", overrides=["train.env_steps=150"])
    assert smoke["train"]["env_steps"] == 150  # --set wins over the suite's block
    assert 2 <= len(smoke.tasks("metaworld")) <= 3
    via_suite = load_params(PARAMS, suite="metaworld", overrides=["suites.metaworld.train.env_steps=160"])
    assert via_suite["train"]["env_steps"] == 160
    with pytest.raises(ConfigError, match="suites.metaworld.tasks.0") as err:
        load_params(PARAMS, overrides=["suites.metaworld.tasks=[reach-v2]"])
    assert "\n" not in str(err.value)
