# The MoW / STORM reproduction pipeline. Rules live in workflow/rules/, logic in `mow`.
#   snakemake --cores all                         # everything at the scale in params.yaml
#   snakemake --cores all --config scale=paper    # the published configuration
import sys

from snakemake.utils import validate

from mow.config import resolve

configfile: "params.yaml"
validate(config, "workflow/schemas/params.schema.yaml")

P = resolve(dict(config), scale=config["scale"])   # preset applied, cross-key rules checked
SCALE = P["scale"]
MOW = f"{sys.executable} -m mow"

include: "workflow/rules/common.smk"
include: "workflow/rules/storm.smk"

rule all:
    default_target: True
    input:
        storm_results(),
