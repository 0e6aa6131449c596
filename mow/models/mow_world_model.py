"""MoW world model (SPEC §1.2-1.6): cluster-specific categorical VAEs and heads, N_e expert
(token mixer + causal Transformer) pairs chosen per task by a router, one shared causal
Transformer, a shared task-ID head, and the multi-task loss L_H + 0.1 · L_bal.

Everything reuses the STORM blocks (``CategoricalVAE``, ``TokenMixer``,
``CausalTransformer``, ``DistHead``/``RewardHead``/``TerminationHead``) with their
``cond_dim`` set to the task-embedding size: e_k is concatenated onto each module's input.

Forward pass for a batch of sequences with one task each (``task_ids`` ``[B]``):

1. e = TaskEmbedding(task_ids); routing of all K tasks (``Routing``).
2. Per VAE cluster c present: encode/decode its sequences with VAE c, conditioned on e.
3. Per expert j used by a present task: run mixer_j + Transformer_j once on all the
   sequences whose task selects j; scale by that task's weight W_{k,j} (DESIGN.md: the
   router then also learns from the task losses) and put the result in the slot of j in
   the task's sorted J_k.
4. Concatenate the top_k slots, append e, project to the shared width (one Linear), run the
   shared Transformer -> h.
5. Per cluster: prior / reward / termination heads on (h, e); shared task head on h.

Open decisions fixed here (defaults in :class:`MoWConfig`, flagged NOT FOUND in SPEC):
sizes (experts and shared Transformer STORM-wide, one layer each: STORM's depth per token),
e_k dimension 96 (TD-MPC2's value), top_k = 2, task head = STORM head trunk + Linear(K),
shared-input projection with bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mow.models.heads import DistHead, RewardHead, TerminationHead, concat_condition, mlp_trunk
from mow.models.linear import Linear
from mow.models.multitask_losses import balance_loss, harmonious_loss
from mow.models.module_batch import ModuleBatch, run_experts, use_module_batches
from mow.models.router import Routing, TaskEmbedding, TaskRouter
from mow.models.row_groups import RowGroup, assemble, group_rows, host_rows, read_back, to_device
from mow.models.transformer import CausalTransformer, KVCache, TokenMixer
from mow.models.vae import CategoricalVAE, images_to_float
from mow.models.world_model import Imagination, Policy, WorldModelConfig, eval_mode
from mow.numerics import TwoHot, categorical_kl, unimix_logits
from mow.profiling import phase


@dataclass(frozen=True)
class MoWConfig:
    """MoW hyper-parameters. ``world`` supplies the VAE, head and loss settings of STORM."""

    world: WorldModelConfig = field(default_factory=WorldModelConfig)
    """VAE sizes, latent, unimix, max_len, head sizes, reward bins, β₁/β₂, free bits."""
    num_tasks: int = 26
    """K: tasks trained jointly."""
    num_clusters: int = 15
    """N_m: VAE / head clusters (NOT FOUND; chosen for the ~255 M-parameter total)."""
    num_experts: int = 12
    """N_e: expert (mixer + Transformer) pairs."""
    top_k: int = 2
    """n_k: experts per task (NOT FOUND)."""
    task_embed_dim: int = 96
    """Size of e_k (NOT FOUND)."""
    router_hidden: int = 256
    """Hidden width of the router MLP."""
    temperature_start: float = 4.0
    """Router softmax temperature at update 0 (NOT FOUND)."""
    temperature_end: float = 1.0
    """Temperature reached at the end of the anneal (SPEC: annealed towards 1)."""
    temperature_anneal_updates: int = 50_000
    """World-model updates of the linear anneal (NOT FOUND)."""
    expert_d_model: int = 512
    """Expert and shared Transformer sizes: NOT FOUND; params.yaml says why one layer each."""
    expert_layers: int = 1
    expert_heads: int = 8
    expert_ffn: int = 1024
    expert_dropout: float = 0.1
    shared_d_model: int = 512
    shared_layers: int = 1
    shared_heads: int = 8
    shared_ffn: int = 1024
    shared_dropout: float = 0.1
    task_loss: float = 1.0
    """Weight of the task-classification CE inside each L_k."""
    balance_coef: float = 0.1
    """Weight of the expert balance loss in the total."""
    sigma_init: float = 1.0
    """Initial σ_k of the harmonious weighting (stored as log σ_k)."""
    use_experts: bool = True
    """False: ablation ``no_experts`` / ``vanilla_multitask``: one token mixer feeds the
    shared Transformer directly (no router, no expert Transformers)."""
    use_shared: bool = True
    """False: ablation ``no_shared``: the projected expert outputs are h (no shared Transformer)."""

    def __post_init__(self) -> None:
        for name in ("num_tasks", "num_clusters", "num_experts", "top_k", "task_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} > num_experts {self.num_experts}")
        if self.sigma_init <= 0:
            raise ValueError(f"sigma_init must be > 0, got {self.sigma_init}")
        if not (self.use_experts or self.use_shared):
            raise ValueError("use_experts and use_shared cannot both be false (no sequence model left)")

    @property
    def state_dim(self) -> int:
        """Agent state size: prior sample (latent_dim) + shared hidden state."""
        return self.world.latent_dim + self.shared_d_model


class Expert(nn.Module):
    """One MoW expert: its own token mixer m_j(z, a, e_k) and causal Transformer f_j."""

    def __init__(self, cfg: MoWConfig, num_actions: int, continuous: bool = False) -> None:
        super().__init__()
        self.mixer = TokenMixer(
            cfg.world.latent_dim, num_actions, cfg.expert_d_model, cfg.task_embed_dim, continuous
        )
        self.transformer = CausalTransformer(
            cfg.expert_d_model,
            cfg.expert_layers,
            cfg.expert_heads,
            cfg.expert_ffn,
            cfg.expert_dropout,
            cfg.world.max_len,
        )

    def forward(
        self,
        z: torch.Tensor,
        actions: torch.Tensor,
        task_embedding: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.transformer(self.mixer(z, actions, task_embedding), cache)


class ClusterHeads(nn.Module):
    """Next-latent prior, reward and termination heads of one cluster, conditioned on e_k."""

    def __init__(self, cfg: MoWConfig) -> None:
        super().__init__()
        w, d, e = cfg.world, cfg.shared_d_model, cfg.task_embed_dim
        self.prior = DistHead(d, w.stoch, w.classes, w.unimix, cond_dim=e)
        self.reward = RewardHead(d, w.head_hidden, w.head_layers, w.reward_bins, cond_dim=e)
        self.termination = TerminationHead(d, w.head_hidden, w.head_layers, cond_dim=e)


@dataclass
class MoWCache:
    """KV caches of the experts in use (keyed by expert index; or one ``batch`` cache over a
    :class:`ModuleBatch`'s padded rows) and of the shared Transformer."""

    experts: dict[int, KVCache]
    shared: KVCache | None
    batch: KVCache | None = None


@dataclass(frozen=True)
class ExpertRoute:
    """The batch rows whose task selects ``expert``, their task embeddings, the router
    weight W_{k,j} of each, and where the expert's output goes in the ``[B·top_k]`` stack
    of expert slots (row r's slot s is position r·top_k + s). Gathered once per route, not
    at every imagined step."""

    expert: int
    rows: torch.Tensor
    embedding: torch.Tensor
    weights: torch.Tensor
    slots: RowGroup


@dataclass
class RowPlan:
    """How a batch's rows split: per VAE/head cluster, per expert, and the tasks present
    (ascending, on the host and as an index tensor on the batch's device)."""

    clusters: list[RowGroup]
    routes: list[ExpertRoute]
    present: list[int]
    present_index: torch.Tensor
    expert_batch: ModuleBatch | None = None   # the routes' experts, batched (inference on CUDA)
    cluster_batch: ModuleBatch | None = None  # the clusters' heads, likewise


class MoWWorldModel(nn.Module):
    """MoW world model over ``cfg.num_tasks`` tasks sharing ``num_actions`` discrete actions
    (or, with ``continuous``, action vectors of that dimension: Meta-World)."""

    #: train.compile leaves this loss eager: its per-cluster row groups are data-dependent
    #: shapes (runtime.MOW_EAGER_NOTE)
    compilable = False
    #: run cluster heads (and, in inference, experts) as ModuleBatches; None: on CUDA (``_batched``)
    batch_modules: bool | None = None

    cluster_of_task: torch.Tensor

    def __init__(self, cfg: MoWConfig, num_actions: int = 18, continuous: bool = False) -> None:
        super().__init__()
        self.cfg, self.num_actions, self.continuous = cfg, num_actions, continuous
        self.state_dim = cfg.state_dim
        w, e = cfg.world, cfg.task_embed_dim
        self.task_embedding = TaskEmbedding(cfg.num_tasks, e)
        self.router = TaskRouter(
            e,
            cfg.router_hidden,
            cfg.num_experts,
            cfg.top_k,
            cfg.temperature_start,
            cfg.temperature_end,
            cfg.temperature_anneal_updates,
        )
        self.vaes = nn.ModuleList(
            CategoricalVAE(
                w.image_size, w.channels, w.encoder_channels, w.stoch, w.classes, w.unimix, e
            )
            for _ in range(cfg.num_clusters)
        )
        # Ablations drop a block entirely (None), so parameter counts and checkpoints show it.
        self.experts = (
            nn.ModuleList(Expert(cfg, num_actions, continuous) for _ in range(cfg.num_experts))
            if cfg.use_experts
            else None
        )
        self.input_mixer = (
            None
            if cfg.use_experts
            else TokenMixer(w.latent_dim, num_actions, cfg.shared_d_model, e, continuous)
        )
        self.shared_input = (
            Linear(cfg.top_k * cfg.expert_d_model + e, cfg.shared_d_model)
            if cfg.use_experts
            else None
        )
        self.shared = (
            CausalTransformer(
                cfg.shared_d_model,
                cfg.shared_layers,
                cfg.shared_heads,
                cfg.shared_ffn,
                cfg.shared_dropout,
                w.max_len,
            )
            if cfg.use_shared
            else None
        )
        self.heads = nn.ModuleList(ClusterHeads(cfg) for _ in range(cfg.num_clusters))
        self.task_head = nn.Sequential(
            mlp_trunk(cfg.shared_d_model, w.head_hidden, w.head_layers),
            Linear(w.head_hidden, cfg.num_tasks),
        )
        self.log_sigma = nn.Parameter(torch.full((cfg.num_tasks,), float(cfg.sigma_init)).log())
        self.two_hot = TwoHot(w.reward_bins)
        # Until clustering has run, tasks are spread round-robin over the clusters.
        self.register_buffer(
            "cluster_of_task", torch.arange(cfg.num_tasks, dtype=torch.long) % cfg.num_clusters
        )

    # ------------------------------------------------------------------ set-up
    def set_clusters(self, assignment: torch.Tensor | list[int]) -> None:
        """Fix the VAE/head cluster i_k of every task (length K, values in [0, N_m))."""
        values = torch.as_tensor(assignment)
        if values.dim() != 1 or values.numel() != self.cfg.num_tasks:
            raise ValueError(
                f"cluster assignment needs {self.cfg.num_tasks} entries (one per task), "
                f"got shape {tuple(values.shape)}"
            )
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"cluster assignment must hold integers, got dtype {values.dtype}")
        for task, cluster in enumerate(values.tolist()):
            if not 0 <= cluster < self.cfg.num_clusters:
                raise ValueError(
                    f"task {task} assigned to cluster {cluster}, outside "
                    f"[0, {self.cfg.num_clusters})"
                )
        self.cluster_of_task.copy_(values.to(self.cluster_of_task.device, torch.long))

    def set_update(self, update: int) -> float:
        """Anneal the router temperature to its value after ``update`` updates; return it."""
        return self.router.anneal(update)

    def routing(self) -> Routing:
        """Routing of all K tasks at the current temperature."""
        return self.router(self.task_embedding())

    # ------------------------------------------------------------------ grouping
    def _plan(
        self,
        task_ids: torch.Tensor,
        routing: Routing | None,
        embedding: torch.Tensor | None = None,
        batched: bool = False,
    ) -> RowPlan:
        """Cluster groups, expert routes (with ``routing`` and the rows' task embeddings
        ``embedding``) and present tasks of a batch of tasks ``task_ids`` ``[B]``, from one
        read of the device's values (:func:`read_back`); with ``batched``, the clusters and
        the routes' experts also as ModuleBatches."""
        with_routes = routing is not None and self.experts is not None
        host = read_back(task_ids, self.cluster_of_task, *([routing.indices] if with_routes else []))
        tasks, clusters = host[0], host[1]
        device = task_ids.device
        keys = clusters[tasks]
        groups = group_rows(keys, device)
        experts, picked = [], []
        if with_routes:
            indices = host[2][tasks]  # [B, top_k]
            experts = torch.unique(indices).tolist()
            picked = [(indices == expert).nonzero(as_tuple=True) for expert in experts]
        uploads = [torch.unique(tasks)]
        uploads += [t for rows, slots in picked for t in (rows, slots, rows * self.cfg.top_k + slots)]
        on_device = to_device(uploads, device)
        routes = []
        for i, expert in enumerate(experts):
            rows, slots, positions = on_device[1 + 3 * i: 4 + 3 * i]
            assert routing is not None and embedding is not None
            routes.append(ExpertRoute(expert, rows, embedding[rows], routing.weights[task_ids[rows], slots],
                                      RowGroup(expert, positions, len(rows))))
        plan = RowPlan(groups, routes, uploads[0].tolist(), on_device[0])
        if batched:
            plan.cluster_batch = ModuleBatch.of([g.key for g in groups], host_rows(keys, groups), device)
            plan.expert_batch = ModuleBatch.of(experts, [rows for rows, _ in picked], device) if experts else None
        return plan

    def _cluster_groups(self, task_ids: torch.Tensor) -> list[RowGroup]:
        return self._plan(task_ids, None).clusters

    def _expert_routes(
        self, task_ids: torch.Tensor, routing: Routing, embedding: torch.Tensor
    ) -> list[ExpertRoute]:
        """Routes of the rows of tasks ``task_ids`` ``[B]`` whose embeddings are ``embedding``."""
        return self._plan(task_ids, routing, embedding).routes

    def new_cache(self, task_ids: torch.Tensor) -> MoWCache:
        """Empty KV caches for the experts that the tasks in ``task_ids`` select."""
        embeddings = self.task_embedding()
        return self._new_cache(self._expert_routes(task_ids, self.router(embeddings), embeddings[task_ids]))

    def _new_cache(self, routes: list[ExpertRoute], expert_batch: ModuleBatch | None = None) -> MoWCache:
        assert self.experts is not None or not routes
        shared = self.shared.new_cache() if self.shared is not None else None
        if expert_batch is not None:
            return MoWCache({}, shared, KVCache(self.cfg.expert_layers, self.cfg.world.max_len))
        return MoWCache(
            {r.expert: self.experts[r.expert].transformer.new_cache() for r in routes},  # type: ignore[index]
            shared,
        )

    def _batched(self, device: torch.device) -> bool:
        """Whether a pass runs modules as ModuleBatches (``use_module_batches``):
        the cluster heads in every pass; the experts in no-grad eval passes only
        (imagination, acting). Batched in the world-model update too, on an H200 the fused
        attention's backward failed under ``vmap`` ("LSE is not correctly aligned") and,
        with the math kernel, the update took 7 % longer in fp32 (README, "On a GPU")."""
        return use_module_batches(self.batch_modules, device)

    # ------------------------------------------------------------------ sequence model
    def _hidden(
        self,
        z: torch.Tensor,
        actions: torch.Tensor,
        embedding: torch.Tensor,
        routes: list[ExpertRoute],
        cache: MoWCache | None = None,
        expert_batch: ModuleBatch | None = None,
    ) -> torch.Tensor:
        if self.experts is None:
            assert self.input_mixer is not None
            tokens = self.input_mixer(z, actions, embedding)
        else:
            assert self.shared_input is not None
            batch, steps = actions.shape[:2]
            top_k, width = self.cfg.top_k, self.cfg.expert_d_model
            if expert_batch is not None:
                out = run_experts(expert_batch, self.experts, z, actions, embedding, cache.batch if cache is not None else None)
                weights = torch.cat([route.weights for route in routes]).to(out.dtype)
                parts = list((out * weights[:, None, None]).split([route.slots.size for route in routes]))
            else:
                parts = []
                for route in routes:
                    rows = route.rows
                    expert_cache = cache.experts[route.expert] if cache is not None else None
                    out = self.experts[route.expert](z[rows], actions[rows], route.embedding, expert_cache)
                    parts.append(out * route.weights.to(out.dtype)[:, None, None])
            features = assemble(parts, [route.slots for route in routes])
            features = features.view(batch, top_k, steps, width)
            features = features.transpose(1, 2).reshape(batch, steps, top_k * width)
            tokens = self.shared_input(concat_condition(features, embedding))
        if self.shared is None:
            return tokens
        return self.shared(tokens, cache.shared if cache is not None else None)

    def hidden_states(
        self,
        z: torch.Tensor,
        actions: torch.Tensor,
        task_ids: torch.Tensor,
        cache: MoWCache | None = None,
    ) -> torch.Tensor:
        """Experts + shared Transformer: ``z`` ``[B, T, latent]``, ``actions`` ``[B, T]``
        (``[B, T, A]`` continuous), ``task_ids`` ``[B]`` -> h ``[B, T, shared_d_model]``. With a cache (from
        :meth:`new_cache` for the same ``task_ids``) the steps continue the cached ones."""
        embeddings = self.task_embedding()
        embedding = embeddings[task_ids]
        routes = self._expert_routes(task_ids, self.router(embeddings), embedding)
        return self._hidden(z, actions, embedding, routes, cache)

    # ------------------------------------------------------------------ training
    def _per_task_mean(self, values: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Mean of per-sequence ``values`` ``[B]`` over each task's sequences -> ``[K]``."""
        zeros = values.new_zeros(self.cfg.num_tasks)
        sums = zeros.index_add(0, task_ids, values)
        counts = zeros.index_add(0, task_ids, torch.ones_like(values))
        return sums / counts.clamp(min=1.0)

    def compute_loss(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminations: torch.Tensor,
        task_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MoW world-model loss L_H + balance_coef · L_bal (SPEC §1.6) on a mixed batch.

        ``obs`` uint8 ``[B, T, H, W, C]``, ``actions`` long ``[B, T]`` (float ``[B, T, A]``
        when continuous), ``rewards`` and
        ``terminations`` ``[B, T]``, ``task_ids`` long ``[B]`` (one task per sequence). Per
        task, L_k = rec + reward + termination + task_loss · CE(task) + β₁ dyn + β₂ rep,
        each term defined as in STORM's ``WorldModel.compute_loss`` but averaged over that
        task's sequences (free bits act on the task's mean KL). The harmonious weighting
        runs over the tasks present in the batch; the balance loss over all K tasks.
        """
        cfg, w = self.cfg, self.cfg.world
        batch, steps = actions.shape[:2]
        embeddings = self.task_embedding()
        routing = self.router(embeddings)
        embedding = embeddings[task_ids]  # [B, E]
        plan = self._plan(task_ids, routing, embedding, self._batched(task_ids.device))
        groups, heads = plan.clusters, plan.cluster_batch

        # Perception: each cluster's VAE on its rows; sampling and errors once over all rows
        # (the same functions for every cluster: one operator each instead of one per cluster).
        frames = images_to_float(obs.flatten(0, 1)).unflatten(0, (batch, steps))  # also the target
        conds = [embedding[g.rows].repeat_interleave(steps, dim=0) for g in groups]
        posterior = assemble(  # [B, T, stoch, classes]
            [self.vaes[g.key].encode_images(frames[g.rows].flatten(0, 1), cond).unflatten(0, (g.size, steps))
             for g, cond in zip(groups, conds)],
            groups,
        )
        z = CategoricalVAE.sample(posterior.flatten(0, 1)).unflatten(0, (batch, steps))
        reconstruction = assemble(
            [self.vaes[g.key].decode(z[g.rows].flatten(0, 1), cond).unflatten(0, (g.size, steps))
             for g, cond in zip(groups, conds)],
            groups,
        )
        rec = (reconstruction.float() - frames).square().sum(dim=(2, 3, 4)).mean(1)  # [B]

        hidden = self._hidden(z, actions, embedding, plan.routes)

        # Cluster heads, then per-sequence losses over all rows at once.
        log_probs = F.log_softmax(self._per_cluster("reward", hidden, embedding, groups, heads).float(), dim=-1)
        reward = -(self.two_hot.encode(rewards) * log_probs).sum(-1).mean(1)
        term_logits = self._per_cluster("termination", hidden, embedding, groups, heads).float()
        termination = F.binary_cross_entropy_with_logits(
            term_logits, terminations.to(term_logits.dtype), reduction="none"
        ).mean(1)
        prior = self._per_cluster("prior", hidden[:, :-1], embedding, groups, heads)
        target = posterior[:, 1:]
        dyn_kl = categorical_kl(target.detach(), prior).mean(1)
        rep_kl = categorical_kl(target, prior.detach()).mean(1)

        task_logits = self.task_head(hidden).float()  # [B, T, K]
        task_ce = F.cross_entropy(
            task_logits.flatten(0, 1), task_ids.repeat_interleave(steps), reduction="none"
        ).view(batch, steps).mean(1)

        terms = {
            name: self._per_task_mean(values, task_ids)
            for name, values in (
                ("rec", rec),
                ("reward", reward),
                ("termination", termination),
                ("task", task_ce),
                ("dyn_kl_raw", dyn_kl),
                ("rep_kl_raw", rep_kl),
            )
        }
        terms["dyn"] = terms["dyn_kl_raw"].clamp(min=w.free_bits)
        terms["rep"] = terms["rep_kl_raw"].clamp(min=w.free_bits)
        task_total = (
            terms["rec"]
            + terms["reward"]
            + terms["termination"]
            + cfg.task_loss * terms["task"]
            + w.loss_dyn * terms["dyn"]
            + w.loss_rep * terms["rep"]
        )
        terms["total"] = task_total

        present = plan.present_index
        harmonious = harmonious_loss(task_total[present], self.log_sigma[present])
        balance = (
            balance_loss(routing.dense, cfg.top_k) if self.experts is not None else harmonious.new_zeros(())
        )
        total = harmonious + cfg.balance_coef * balance

        metrics: dict[str, torch.Tensor] = {
            "wm/total": total,
            "wm/harmonious": harmonious,
            "wm/balance": balance,
            "wm/temperature": self.router.current_temperature,
        }
        sigma = self.log_sigma.detach().exp()
        for task in range(cfg.num_tasks):
            metrics[f"wm/sigma/task{task}"] = sigma[task]
        for task in plan.present:
            for name, values in terms.items():
                metrics[f"wm/{name}/task{task}"] = values[task]
        return total, {name: value.detach() for name, value in metrics.items()}

    # ------------------------------------------------------------------ inference
    def _encode_context(
        self, obs_ctx: torch.Tensor, embedding: torch.Tensor, groups: list[RowGroup]
    ) -> torch.Tensor:
        steps = obs_ctx.shape[1]
        parts = []
        for group in groups:
            vae, rows = self.vaes[group.key], group.rows
            cond = embedding[rows].repeat_interleave(steps, dim=0)
            posterior = vae.encode(obs_ctx[rows].flatten(0, 1), cond)
            parts.append(posterior.view(group.size, steps, *posterior.shape[1:]))
        return CategoricalVAE.sample(assemble(parts, groups))  # one sampling pass for all clusters

    def _per_cluster(
        self, head: str, x: torch.Tensor, embedding: torch.Tensor, groups: list[RowGroup],
        cluster_batch: ModuleBatch | None = None,
    ) -> torch.Tensor:
        """Each cluster's ``head`` (``prior``: unimixed logits, ``reward``, ``termination``)
        on its rows of ``x`` ``[B, ...]``, in batch order: one call per cluster, or one for
        all of them (``cluster_batch``). Looped, the prior's uniform mix, the same
        elementwise function for every cluster, runs once over all rows."""
        if cluster_batch is not None:
            out = cluster_batch.vmap(head, [getattr(h, head) for h in self.heads], lambda call, x, e: call(x, e),
                                     cluster_batch.rows(x), cluster_batch.rows(embedding))
            return cluster_batch.in_batch_order(out, groups)
        if head == "prior":
            raw = assemble([self.heads[g.key].prior.raw_logits(x[g.rows], embedding[g.rows]) for g in groups], groups)
            return unimix_logits(raw, self.cfg.world.unimix)
        return assemble([getattr(self.heads[g.key], head)(x[g.rows], embedding[g.rows]) for g in groups], groups)

    def _prior_state(
        self,
        hidden: torch.Tensor,
        embedding: torch.Tensor,
        groups: list[RowGroup],
        cluster_batch: ModuleBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ẑ ~ prior_{i_k}(h, e_k); return (ẑ, agent state [ẑ, h]) in float32. The
        sample runs once over all rows (imagination calls this at every step, and each
        per-cluster operator is one more GPU kernel launch per step and cluster)."""
        z = CategoricalVAE.sample(self._per_cluster("prior", hidden, embedding, groups, cluster_batch))
        return z, torch.cat([z, hidden.float()], dim=-1)

    def _start(
        self, obs_ctx: torch.Tensor, act_ctx: torch.Tensor, task_ids: torch.Tensor, with_cache: bool
    ):
        embeddings = self.task_embedding()
        embedding = embeddings[task_ids]
        plan = self._plan(task_ids, self.router(embeddings), embedding, self._batched(task_ids.device))
        cache = self._new_cache(plan.routes, plan.expert_batch) if with_cache else None
        z = self._encode_context(obs_ctx, embedding, plan.clusters)
        hidden = self._hidden(z, act_ctx, embedding, plan.routes, cache, plan.expert_batch)[:, -1]
        return hidden, embedding, plan, cache

    @torch.no_grad()
    def posterior_sample(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Posterior sample of uint8 frames ``[B, H, W, C]`` through each task's cluster VAE."""
        with eval_mode(self):
            embedding = self.task_embedding(task_ids)
            groups = self._cluster_groups(task_ids)
            return self._encode_context(obs[:, None], embedding, groups)[:, 0]

    @torch.no_grad()
    def act_state(
        self, obs_ctx: torch.Tensor, act_ctx: torch.Tensor, task_ids: torch.Tensor
    ) -> torch.Tensor:
        """Agent state ``[B, state_dim]`` = [ẑ ~ prior(h_{L-1}), h_{L-1}] from the last L
        (frame, action) pairs of each sequence (uint8 ``[B, L, H, W, C]``, long ``[B, L]``)
        of task ``task_ids`` ``[B]``; eval mode, like STORM's ``act_state``."""
        with eval_mode(self):
            hidden, embedding, plan, _ = self._start(obs_ctx, act_ctx, task_ids, False)
            return self._prior_state(hidden, embedding, plan.clusters, plan.cluster_batch)[1]

    @torch.no_grad()
    def imagine(
        self,
        policy: Policy,
        obs_ctx: torch.Tensor,
        act_ctx: torch.Tensor,
        task_ids: torch.Tensor,
        horizon: int,
    ) -> Imagination:
        """Roll out ``horizon`` steps from real contexts with KV caches (SPEC §1.4.5, §6.6).

        Mirrors STORM's ``WorldModel.imagine``: one parallel pass over the context fills
        the caches of the experts each task selects and of the shared Transformer; each
        imagined step samples ẑ from the task's cluster prior, asks ``policy`` for actions
        and feeds (ẑ, a) through only those experts and the shared Transformer. Reward and
        termination heads of each cluster run once after the loop. Eval mode throughout.
        """
        batch = act_ctx.shape[0]
        with eval_mode(self):
            with phase("context"):
                hidden, embedding, plan, cache = self._start(obs_ctx, act_ctx, task_ids, True)
            groups, cluster_batch = plan.clusters, plan.cluster_batch
            states = torch.empty(batch, horizon + 1, self.state_dim, device=hidden.device)
            actions, hiddens = [], []  # actions: [B] long or [B, A] float per step
            with phase("rollout"):
                for step in range(horizon):
                    z, state = self._prior_state(hidden, embedding, groups, cluster_batch)
                    states[:, step] = state
                    actions.append(policy(state))
                    hidden = self._hidden(
                        z.unsqueeze(1), actions[-1].unsqueeze(1), embedding, plan.routes, cache, plan.expert_batch
                    )[:, 0]
                    hiddens.append(hidden)
                states[:, horizon] = self._prior_state(hidden, embedding, groups, cluster_batch)[1]
            with phase("reward_termination"):
                imagined = torch.stack(hiddens, dim=1)
                reward_logits = self._per_cluster("reward", imagined, embedding, groups, cluster_batch)
                termination_logits = self._per_cluster("termination", imagined, embedding, groups, cluster_batch)
                rewards = self.two_hot.decode(reward_logits)
                terminations = (termination_logits > 0).float()
        return Imagination(states, torch.stack(actions, dim=1), rewards, terminations)


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def mow_parameter_breakdown(cfg: MoWConfig | None = None, num_actions: int = 18) -> dict[str, int]:
    """Parameters per MoW world-model component, built on the meta device (no allocation).

    The values sum to every parameter of :class:`MoWWorldModel` (the actor-critic is
    counted separately, e.g. with ``storm_parameter_breakdown``'s actor/critic entries).
    """
    cfg = cfg or MoWConfig()
    with torch.device("meta"):
        model = MoWWorldModel(cfg, num_actions)
    return {
        "vaes": _count(model.vaes),
        "experts": _count(*(m for m in (model.experts, model.input_mixer) if m is not None)),
        "shared": _count(*(m for m in (model.shared_input, model.shared) if m is not None)),
        "cluster_heads": _count(model.heads),
        "task_head": _count(model.task_head),
        "task_embedding": _count(model.task_embedding),
        "router": _count(model.router),
        "harmonious_sigma": model.log_sigma.numel(),
    }
