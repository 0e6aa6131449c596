"""Tests of the STORM networks: KV cache, imagination, losses, masking, parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mow.models import (
    ActorCritic,
    AgentConfig,
    CategoricalVAE,
    CausalTransformer,
    DistHead,
    Imagination,
    RewardHead,
    TerminationHead,
    TokenMixer,
    WorldModel,
    WorldModelConfig,
    count_parameters,
    storm_parameter_breakdown,
)
from mow.numerics import categorical_kl

torch.set_num_threads(2)

TINY = WorldModelConfig(
    image_size=16,
    encoder_channels=(4, 8),
    stoch=4,
    classes=5,
    d_model=32,
    layers=2,
    heads=4,
    ffn=48,
    max_len=32,
    head_hidden=24,
    reward_bins=17,
)
TINY_AGENT = AgentConfig(hidden=24, value_bins=17)
NUM_ACTIONS = 3

# Minimal ALE action-set sizes of the 26 Atari-100k games (SPEC §5).
MINIMAL_ACTIONS = {
    "Alien": 18, "Amidar": 10, "Assault": 7, "Asterix": 9, "BankHeist": 18, "BattleZone": 18,
    "Boxing": 18, "Breakout": 4, "ChopperCommand": 18, "CrazyClimber": 9, "DemonAttack": 6,
    "Freeway": 3, "Frostbite": 18, "Gopher": 8, "Hero": 18, "Jamesbond": 18, "Kangaroo": 18,
    "Krull": 18, "KungFuMaster": 14, "MsPacman": 9, "Pong": 6, "PrivateEye": 18, "Qbert": 6,
    "RoadRunner": 18, "Seaquest": 18, "UpNDown": 6,
}  # fmt: skip


def random_batch(batch: int, steps: int, cfg: WorldModelConfig = TINY, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randint(
        0, 256, (batch, steps, cfg.image_size, cfg.image_size, cfg.channels),
        dtype=torch.uint8, generator=generator,
    )  # fmt: skip
    actions = torch.randint(0, NUM_ACTIONS, (batch, steps), generator=generator)
    rewards = torch.randn(batch, steps, generator=generator)
    terminations = torch.rand(batch, steps, generator=generator) < 0.2
    return obs, actions, rewards, terminations


# ---------------------------------------------------------------- KV cache


def test_kv_cache_matches_full_causal_forward():
    torch.manual_seed(0)
    transformer = CausalTransformer(d_model=32, layers=2, heads=4, ffn=48, max_len=32).eval()
    tokens = torch.randn(3, 12, 32)
    with torch.no_grad():
        full = transformer(tokens)

        cache = transformer.new_cache()
        one_by_one = torch.cat([transformer(tokens[:, t : t + 1], cache) for t in range(12)], 1)
        assert cache.length == 12

        cache = transformer.new_cache()
        context = transformer(tokens[:, :8], cache)  # context in one call
        chunk = transformer(tokens[:, 8:10], cache)  # a multi-step chunk after a prefix
        steps = [transformer(tokens[:, t : t + 1], cache) for t in (10, 11)]
        chunked = torch.cat([context, chunk, *steps], dim=1)

    assert (one_by_one - full).abs().max() < 1e-4
    assert (chunked - full).abs().max() < 1e-4
    # Causality: changing a later token does not change earlier outputs.
    changed = tokens.clone()
    changed[:, 7] += torch.randn(3, 32)
    with torch.no_grad():
        again = transformer(changed)
    assert (again[:, :7] - full[:, :7]).abs().max() < 1e-6
    assert (again[:, 7:] - full[:, 7:]).abs().max() > 1e-3


def test_kv_cache_overflow_is_an_error():
    transformer = CausalTransformer(d_model=16, layers=1, heads=2, ffn=16, max_len=4).eval()
    cache = transformer.new_cache()
    with torch.no_grad():
        transformer(torch.randn(1, 4, 16), cache)
        with pytest.raises(ValueError, match="max_len"):
            transformer(torch.randn(1, 1, 16), cache)


def test_token_mixer_action_lookup_equals_one_hot_linear():
    torch.manual_seed(0)
    mixer = TokenMixer(latent_dim=6, num_actions=4, d_model=8, cond_dim=3)
    z, cond = torch.randn(2, 5, 6), torch.randn(2, 3)
    actions = torch.randint(0, 4, (2, 5))
    one_hot = torch.nn.functional.one_hot(actions, 4).float()
    # The equivalent single Linear over [z, cond, one_hot(a)].
    weight = torch.cat([mixer.latent_proj.weight, mixer.action_embed.weight.T], dim=1)
    inputs = torch.cat([z, cond[:, None].expand(2, 5, 3), one_hot], dim=-1)
    expected = mixer.body(inputs @ weight.T)
    torch.testing.assert_close(mixer(z, actions, cond), expected)


# ---------------------------------------------------------------- VAE


def test_eval_encoder_folds_batch_norm_exactly():
    torch.manual_seed(0)
    vae = CategoricalVAE(16, 3, (4, 8), stoch=4, classes=5)
    for norm in vae.encoder.norms:  # non-trivial running statistics and affine parameters
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    obs = random_batch(3, 2)[0].flatten(0, 1)
    vae.eval()
    with torch.no_grad():
        x = obs.permute(0, 3, 1, 2).float() / 255
        for conv, norm in zip(vae.encoder.convs, vae.encoder.norms):
            x = torch.relu(norm(conv(x)))  # the unfolded reference, eval statistics
        expected = vae.posterior_head(x.flatten(1))
        torch.testing.assert_close(vae.encode(obs), expected, rtol=1e-4, atol=1e-4)


def test_vae_shapes_and_straight_through_sample():
    torch.manual_seed(0)
    vae = CategoricalVAE(16, 3, (4, 8), stoch=4, classes=5)
    obs = random_batch(3, 2)[0].flatten(0, 1)
    logits = vae.encode(obs)
    assert logits.shape == (6, 4, 5) and logits.dtype == torch.float32
    probs = logits.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, 4))
    assert probs.min() >= 0.01 / 5 - 1e-6  # 1 % unimix floor
    z = vae.sample(logits)
    assert z.shape == (6, 20) and z.requires_grad
    torch.testing.assert_close(z.view(6, 4, 5).sum(-1), torch.ones(6, 4))
    assert vae.decode(z).shape == (6, 3, 16, 16)
    (z * torch.randn(6, 20)).sum().backward()  # straight-through: gradient reaches the encoder
    assert vae.encoder.convs[0].weight.grad.abs().sum() > 0


def test_conditioning_input_reaches_every_conditioned_module():
    """MoW feeds a task embedding through the optional ``cond`` input of each module."""
    torch.manual_seed(0)
    cond_a, cond_b = torch.randn(2, 6), torch.randn(2, 6)
    h = torch.randn(2, 5, 32)
    modules = [
        DistHead(32, 4, 5, cond_dim=6),
        RewardHead(32, 24, 2, bins=17, cond_dim=6),
        TerminationHead(32, 24, 2, cond_dim=6),
    ]
    shapes = [(2, 5, 4, 5), (2, 5, 17), (2, 5)]
    for module, shape in zip(modules, shapes, strict=True):
        out_a, out_b = module(h, cond_a), module(h, cond_b)
        assert out_a.shape == shape
        assert (out_a - out_b).abs().max() > 1e-4
    # One embedding for the whole batch broadcasts like a per-sample one.
    torch.testing.assert_close(modules[2](h, cond_a[0]), modules[2](h, cond_a[:1].expand(2, 6)))

    vae = CategoricalVAE(16, 3, (4, 8), stoch=4, classes=5, cond_dim=6).eval()
    obs = random_batch(2, 1)[0].flatten(0, 1)
    assert (vae.encode(obs, cond_a) - vae.encode(obs, cond_b)).abs().max() > 1e-4
    z = vae.sample(vae.encode(obs, cond_a))
    assert (vae.decode(z, cond_a) - vae.decode(z, cond_b)).abs().max() > 1e-4


# ---------------------------------------------------------------- world model


def test_imagination_shapes_and_modes():
    torch.manual_seed(0)
    world_model = WorldModel(TINY, NUM_ACTIONS).train()
    obs, actions, _, _ = random_batch(5, 8)
    running_mean = world_model.vae.encoder.norms[0].running_mean.clone()
    policy_calls = []

    def policy(state):
        policy_calls.append(state.shape)
        return torch.randint(0, NUM_ACTIONS, state.shape[:1])

    imag = world_model.imagine(policy, obs, actions, horizon=6)
    assert isinstance(imag, Imagination)
    state_dim = TINY.stoch * TINY.classes + TINY.d_model
    assert world_model.state_dim == state_dim
    assert imag.states.shape == (5, 7, state_dim) and imag.states.dtype == torch.float32
    assert imag.actions.shape == (5, 6) and imag.actions.dtype == torch.long
    assert imag.rewards.shape == (5, 6) and imag.rewards.dtype == torch.float32
    assert imag.terminations.shape == (5, 6)
    assert set(imag.terminations.unique().tolist()) <= {0.0, 1.0}
    assert policy_calls == [(5, state_dim)] * 6
    # The latent part of every state is a one-hot sample per variable.
    latent = imag.states[..., : TINY.stoch * TINY.classes].view(5, 7, TINY.stoch, TINY.classes)
    assert torch.all(latent.sum(-1) == 1.0) and torch.all((latent == 0) | (latent == 1))
    # Eval mode inside (BatchNorm statistics untouched), training mode restored afterwards.
    torch.testing.assert_close(world_model.vae.encoder.norms[0].running_mean, running_mean)
    assert all(module.training for module in world_model.modules())


def test_imagination_with_cache_equals_recomputing_full_sequences():
    torch.manual_seed(0)
    world_model = WorldModel(TINY, NUM_ACTIONS).eval()
    obs, actions, _, _ = random_batch(4, 8)
    # A deterministic policy that depends on the state, so a cache error changes the actions.
    projection = torch.randn(world_model.state_dim, NUM_ACTIONS)
    policy = lambda state: (state @ projection).argmax(-1)
    horizon = 5

    torch.manual_seed(1)
    imag = world_model.imagine(policy, obs, actions, horizon)

    torch.manual_seed(1)  # same random draws, in the same order, without the cache
    with torch.no_grad():
        z = world_model.vae.sample(world_model.vae.encode(obs.flatten(0, 1))).view(4, 8, -1)
        tokens = world_model.mixer(z, actions)
        hidden = world_model.transformer(tokens)[:, -1]
        states, hiddens = [], []
        for _ in range(horizon + 1):
            z = world_model.vae.sample(world_model.prior_head(hidden))
            states.append(torch.cat([z, hidden], dim=-1))
            if len(states) > horizon:
                break
            action = policy(states[-1])
            tokens = torch.cat([tokens, world_model.mixer(z[:, None], action[:, None])], dim=1)
            hidden = world_model.transformer(tokens)[:, -1]
            hiddens.append(hidden)
        rewards = world_model.two_hot.decode(world_model.reward_head(torch.stack(hiddens, 1)))
    assert (imag.states - torch.stack(states, 1)).abs().max() < 1e-4
    assert (imag.rewards - rewards).abs().max() < 1e-4


def test_act_state_is_prior_sample_and_last_hidden():
    torch.manual_seed(0)
    world_model = WorldModel(TINY, NUM_ACTIONS).train()
    obs, actions, _, _ = random_batch(2, 16)
    torch.manual_seed(3)
    state = world_model.act_state(obs, actions)
    assert state.shape == (2, world_model.state_dim)
    assert world_model.training
    torch.manual_seed(3)
    world_model.eval()
    with torch.no_grad():
        z = world_model.vae.sample(world_model.vae.encode(obs.flatten(0, 1))).view(2, 16, -1)
        hidden = world_model.transformer(world_model.mixer(z, actions))[:, -1]
        prior_z = world_model.vae.sample(world_model.prior_head(hidden))
    torch.testing.assert_close(state, torch.cat([prior_z, hidden], dim=-1))


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_world_model_training_step_reaches_every_parameter(autocast):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, free_bits=0.0)  # keep both KL terms active at init
    world_model = WorldModel(cfg, NUM_ACTIONS).train()
    obs, actions, rewards, terminations = random_batch(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = world_model.compute_loss(obs, actions, rewards, terminations)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected_metrics = {
        "wm/total", "wm/rec", "wm/reward", "wm/termination", "wm/dyn", "wm/rep",
        "wm/dyn_kl_raw", "wm/posterior_entropy",
    }  # fmt: skip
    assert set(metrics) == expected_metrics
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    total = (
        metrics["wm/rec"] + metrics["wm/reward"] + metrics["wm/termination"]
        + cfg.loss_dyn * metrics["wm/dyn"] + cfg.loss_rep * metrics["wm/rep"]
    )  # fmt: skip
    torch.testing.assert_close(metrics["wm/total"], total)
    loss.backward()
    for name, grad in _gradients(world_model).items():
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all(), f"{name} has a non-finite gradient"
        assert grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_world_model_loss_terms_follow_the_spec_alignment():
    """Recompute every loss term by hand from the parts (eval mode: no dropout randomness)."""
    torch.manual_seed(0)
    world_model = WorldModel(TINY, NUM_ACTIONS).eval()
    obs, actions, rewards, terminations = random_batch(3, 7)
    torch.manual_seed(1)
    _, metrics = world_model.compute_loss(obs, actions, rewards, terminations)

    torch.manual_seed(1)  # the same posterior sample
    with torch.no_grad():
        posterior = world_model.vae.encode(obs.flatten(0, 1))
        z = world_model.vae.sample(posterior)
        images = obs.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        squared_error = (world_model.vae.decode(z) - images) ** 2
        hidden = world_model.transformer(world_model.mixer(z.view(3, 7, -1), actions))
        prior = world_model.prior_head(hidden)
        posterior = posterior.view(3, 7, TINY.stoch, TINY.classes)
        aligned_kl = categorical_kl(posterior[:, 1:], prior[:, :-1]).mean()
        misaligned_kl = categorical_kl(posterior[:, :-1], prior[:, :-1]).mean()
        reward_loss = world_model.two_hot.loss(world_model.reward_head(hidden), rewards)
        termination_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            world_model.termination_head(hidden), terminations.float()
        )
    # Squared error summed over C, H, W, averaged over the 3 x 7 frames.
    torch.testing.assert_close(metrics["wm/rec"], squared_error.sum() / 21)
    torch.testing.assert_close(metrics["wm/dyn_kl_raw"], aligned_kl)
    assert (aligned_kl - misaligned_kl).abs() > 1e-3
    torch.testing.assert_close(metrics["wm/dyn"], aligned_kl.clamp(min=TINY.free_bits))
    torch.testing.assert_close(metrics["wm/reward"], reward_loss)
    torch.testing.assert_close(metrics["wm/termination"], termination_loss)


def test_encoder_gradient_flows_through_the_representation_loss():
    obs, actions, rewards, terminations = random_batch(2, 6)

    def encoder_grad(loss_rep: float) -> torch.Tensor:
        torch.manual_seed(0)
        cfg = dataclasses.replace(TINY, free_bits=0.0, loss_rep=loss_rep)
        world_model = WorldModel(cfg, NUM_ACTIONS).train()
        torch.manual_seed(1)
        world_model.compute_loss(obs, actions, rewards, terminations)[0].backward()
        return world_model.vae.encoder.convs[0].weight.grad.clone()

    without_rep = encoder_grad(0.0)  # reconstruction (and the reward/termination path) only
    assert without_rep.abs().sum() > 0
    assert (encoder_grad(0.1) - without_rep).abs().max() > 1e-7


def test_free_bits_block_kl_gradients_when_the_mean_kl_is_small():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, free_bits=1e6)
    world_model = WorldModel(cfg, NUM_ACTIONS).train()
    loss, metrics = world_model.compute_loss(*random_batch(2, 6))
    assert metrics["wm/dyn"].item() == 1e6 and metrics["wm/rep"].item() == 1e6
    loss.backward()
    # The prior head is trained only by the dynamics KL, which is clipped here.
    assert world_model.prior_head.linear.weight.grad.abs().sum() == 0


# ---------------------------------------------------------------- actor-critic


def make_imagination(batch: int = 6, horizon: int = 5, seed: int = 0) -> Imagination:
    torch.manual_seed(seed)
    world_model = WorldModel(TINY, NUM_ACTIONS)
    obs, actions, _, _ = random_batch(batch, 4, seed=seed)
    policy = lambda state: torch.randint(0, NUM_ACTIONS, state.shape[:1])
    return world_model.imagine(policy, obs, actions, horizon)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_actor_critic_training_step(autocast):
    torch.manual_seed(0)
    imag = make_imagination()
    imag.rewards = torch.randn_like(imag.rewards) * 5  # returns worth normalising
    agent = ActorCritic(TINY_AGENT, imag.states.shape[-1], NUM_ACTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = agent.compute_loss(imag)
    assert set(metrics) == {
        "ac/total", "ac/policy", "ac/value", "ac/entropy", "ac/return_mean", "ac/scale",
        "ac/advantage_mean",
    }  # fmt: skip
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert agent.normalizer.high.item() != 0.0  # percentile EMAs updated inside
    loss.backward()
    for name, grad in _gradients(agent).items():
        if name.startswith("slow_critic."):
            assert grad is None, f"{name} must not be trained"
        else:
            assert grad is not None and torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_slow_critic_ema_and_checkpoint_state():
    torch.manual_seed(0)
    agent = ActorCritic(TINY_AGENT, 40, NUM_ACTIONS)
    slow_before = [p.clone() for p in agent.slow_critic.parameters()]
    for p, slow in zip(agent.critic.parameters(), slow_before):
        torch.testing.assert_close(p, slow)  # starts as a copy
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    agent.update_slow_critic()
    for slow, before in zip(agent.slow_critic.parameters(), slow_before):
        torch.testing.assert_close(slow, before + 0.02)  # 0.98 * slow + 0.02 * (slow + 1)
    state = agent.state_dict()
    assert {"normalizer.low", "normalizer.high"} <= set(state)
    assert any(key.startswith("slow_critic.") for key in state)


def test_action_mask_restricts_sampling_and_greedy():
    torch.manual_seed(0)
    agent = ActorCritic(TINY_AGENT, 10, 5)
    with torch.no_grad():  # logits = bias: best overall is action 4, best legal is 3
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.copy_(torch.tensor([2.0, 1.0, 0.0, 1.5, 3.0]))
    states = torch.randn(20000, 10)
    mask = torch.tensor([[False, True, False, True, False]])
    sampled = agent.act(states, action_mask=mask)
    assert set(sampled.unique().tolist()) == {1, 3}
    assert agent.act(states[:4], greedy=True).tolist() == [4] * 4
    assert agent.act(states[:4], greedy=True, action_mask=mask).tolist() == [3] * 4
    # Per-row masks.
    rows = torch.tensor([[True, False, False, False, False], [False, False, True, False, False]])
    assert agent.act(states[:2], action_mask=rows).tolist() == [0, 2]


def test_masked_actor_critic_loss_is_finite():
    imag = make_imagination()
    agent = ActorCritic(TINY_AGENT, imag.states.shape[-1], NUM_ACTIONS)
    mask = torch.tensor([[True, True, True]])
    loss, metrics = agent.compute_loss(imag, action_mask=mask)
    reference, _ = ActorCritic(TINY_AGENT, imag.states.shape[-1], NUM_ACTIONS).compute_loss(imag)
    assert torch.isfinite(loss)
    imag.actions.clamp_(max=1)  # all taken actions legal under the mask below
    mask = torch.tensor([[True, True, False]])
    loss, metrics = agent.compute_loss(imag, action_mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(metrics["ac/entropy"])
    assert metrics["ac/entropy"].item() <= torch.log(torch.tensor(2.0)).item() + 1e-6
    assert all(torch.isfinite(p.grad).all() for p in agent.actor.parameters())
    del reference


def test_agent_config_validates_lambda_form():
    with pytest.raises(ValueError, match="lambda_form"):
        AgentConfig(lambda_form="dreamer")
    AgentConfig(lambda_form="paper")


# ---------------------------------------------------------------- parameter counts


def test_storm_parameter_count_matches_spec():
    world_model = WorldModel(WorldModelConfig(), 18)
    agent = ActorCritic(AgentConfig(), world_model.state_dim, 18)
    assert world_model.state_dim == 1536
    total = count_parameters(world_model, agent)
    assert total == pytest.approx(19.94e6, rel=0.005)
    assert count_parameters(world_model) == pytest.approx(16.51e6, rel=0.005)
    assert count_parameters(agent.actor) == pytest.approx(1.06e6, rel=0.005)
    assert count_parameters(agent.critic) == pytest.approx(1.18e6, rel=0.005)
    assert count_parameters(agent.slow_critic) == pytest.approx(1.18e6, rel=0.005)

    breakdown = storm_parameter_breakdown(18)
    assert sum(breakdown.values()) == total
    spec_millions = {  # SPEC §4.5, rounded to 10k parameters
        "encoder": 0.69, "posterior_head": 4.20, "decoder": 4.88, "prior_head": 0.53,
        "reward_head": 0.66, "termination_head": 0.53,
    }  # fmt: skip
    for name, millions in spec_millions.items():
        assert breakdown[name] / 1e6 == pytest.approx(millions, abs=0.005), name
    # "Transformer 5.02 M + 512·|A|" in the SPEC includes the token mixer.
    mixer_and_transformer = breakdown["token_mixer"] + breakdown["transformer"]
    assert (mixer_and_transformer - 512 * 18) / 1e6 == pytest.approx(5.02, abs=0.005)


def test_26_storm_agents_total_matches_reported_size():
    assert len(MINIMAL_ACTIONS) == 26
    total = sum(sum(storm_parameter_breakdown(n).values()) for n in MINIMAL_ACTIONS.values())
    assert total == pytest.approx(518.19e6, rel=0.005)
    assert total * 4 / 2**20 == pytest.approx(1977.5, rel=0.005)  # fp32 MiB as reported


def test_eval_mode_switches_every_module_and_restores_each_ones_own_mode():
    from torch import nn

    from mow.models.world_model import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.1)))
    model[2][1].eval()   # a submodule already in eval mode stays so
    before = [m.training for m in model.modules()]
    assert before == [True, True, True, True, True, False]
    x = torch.ones(4, 2)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert torch.equal(model[1](x), x)   # dropout is off
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), eval_mode(model):   # restored on an exception too
        raise RuntimeError
    assert [m.training for m in model.modules()] == before
