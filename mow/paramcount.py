"""Parameter counts per component, in the paper's unit (MiB of fp32 weights).

SPEC 4.5: one STORM at 18 actions has 19.94 M parameters; the 26 single-game STORMs with
minimal action sets total 518.19 M = 1976.7 MiB, the paper's "1977.5 MB".
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_STORM26_MIB = 1977.5
PAPER_MOW_MIB = 972.5


def mib_fp32(n_params: int) -> float:
    return n_params * 4 / 2**20


@dataclass
class ParamsTable:
    components: list[str]
    columns: dict[str, dict[str, int]]   # column name -> component -> parameters
    references: dict[str, float]         # column name -> the paper's MiB, where it reports one

    def totals(self) -> dict[str, int]:
        return {c: sum(v.values()) for c, v in self.columns.items()}

    def as_dict(self) -> dict:
        return {"unit": "parameters; MiB = 4 bytes per parameter / 2**20", "columns": self.columns,
                "totals": self.totals(), "totals_mib_fp32": {c: mib_fp32(t) for c, t in self.totals().items()},
                "paper_mib_fp32": self.references}

    def render(self) -> str:
        names = list(self.columns)
        width = max(len(c) for c in self.components + ["component", "total", "total MiB (fp32)", "paper MiB"]) + 2
        colw = max(14, *(len(n) + 2 for n in names))
        lines = ["component".ljust(width) + "".join(n.rjust(colw) for n in names)]
        for comp in self.components:
            lines.append(comp.ljust(width) + "".join(f"{self.columns[n].get(comp, 0) / 1e6:>{colw}.3f}" for n in names))
        totals = self.totals()
        lines.append("total (M)".ljust(width) + "".join(f"{totals[n] / 1e6:>{colw}.3f}" for n in names))
        lines.append("total MiB (fp32)".ljust(width) + "".join(f"{mib_fp32(totals[n]):>{colw}.1f}" for n in names))
        lines.append("paper MiB".ljust(width) + "".join(
            (f"{self.references[n]:>{colw}.1f}" if n in self.references else "-".rjust(colw)) for n in names))
        return "\n".join(lines)


# Components shared by both methods, so the columns line up (MoW-only parts get own rows).
COMPONENTS = ["VAEs (encoder, posterior, decoder)", "sequence model (mixers, Transformers)",
              "dynamics, reward, termination heads", "task head, embedding, router, sigma", "actor", "critics",
              "slow critics"]


def _storm_groups(parts: dict[str, int]) -> dict[str, int]:
    return {COMPONENTS[0]: parts["encoder"] + parts["posterior_head"] + parts["decoder"],
            COMPONENTS[1]: parts["token_mixer"] + parts["transformer"],
            COMPONENTS[2]: parts["prior_head"] + parts["reward_head"] + parts["termination_head"],
            COMPONENTS[3]: 0, COMPONENTS[4]: parts["actor"], COMPONENTS[5]: parts["critic"],
            COMPONENTS[6]: parts["slow_critic"]}


def mow_breakdown(params=None) -> dict[str, int]:
    """The Atari MoW agent (26 tasks, 18 shared actions) of `params` (default: the paper
    configuration in ./params.yaml), built on the meta device."""
    import torch

    from mow.config import load_params
    from mow.envs import ATARI_GAMES
    from mow.models import count_parameters
    from mow.models.actor_critic import MultiTaskActorCritic
    from mow.models.mow_world_model import mow_parameter_breakdown

    params = params or load_params(scale="paper")
    cfg = params.mow_config(len(ATARI_GAMES))
    wm = mow_parameter_breakdown(cfg, 18)
    masks = torch.ones(len(ATARI_GAMES), 18, dtype=torch.bool)  # masks hold no parameters
    with torch.device("meta"):
        ac = MultiTaskActorCritic(params.agent_config(), cfg.state_dim, 18, masks, cfg.num_clusters)
    return {COMPONENTS[0]: wm["vaes"], COMPONENTS[1]: wm["experts"] + wm["shared"], COMPONENTS[2]: wm["cluster_heads"],
            COMPONENTS[3]: wm["task_head"] + wm["task_embedding"] + wm["router"] + wm["harmonious_sigma"],
            COMPONENTS[4]: count_parameters(ac.actor), COMPONENTS[5]: count_parameters(ac.critics),
            COMPONENTS[6]: count_parameters(ac.slow_critics)}


def params_table(params=None) -> ParamsTable:
    """MoW (one agent, 26 games) beside one STORM and the 26 single-game STORMs."""
    from mow.envs import ATARI_GAMES, ATARI_MINIMAL_ACTIONS
    from mow.models import storm_parameter_breakdown

    one = _storm_groups(storm_parameter_breakdown(18))
    many: dict[str, int] = {}
    for game in ATARI_GAMES:
        for comp, n in _storm_groups(storm_parameter_breakdown(ATARI_MINIMAL_ACTIONS[game])).items():
            many[comp] = many.get(comp, 0) + n
    return ParamsTable(components=list(COMPONENTS),
                       columns={"MoW (26 games)": mow_breakdown(params), "STORM x1 (18 act.)": one,
                                "STORM x26 (minimal)": many},
                       references={"MoW (26 games)": PAPER_MOW_MIB, "STORM x26 (minimal)": PAPER_STORM26_MIB})
