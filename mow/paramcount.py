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


def params_table() -> ParamsTable:
    from mow.envs import ATARI_GAMES, ATARI_MINIMAL_ACTIONS
    from mow.models import storm_parameter_breakdown

    one = storm_parameter_breakdown(18)
    many: dict[str, int] = {}
    for game in ATARI_GAMES:
        for comp, n in storm_parameter_breakdown(ATARI_MINIMAL_ACTIONS[game]).items():
            many[comp] = many.get(comp, 0) + n
    return ParamsTable(components=list(one), columns={"STORM x1 (18 act.)": one, "STORM x26 (minimal)": many},
                       references={"STORM x26 (minimal)": PAPER_STORM26_MIB})
