"""Load `params.yaml`, apply the scale preset and command-line overrides, validate, freeze.

Resolution order: file -> `scales[<scale>]` preset -> `variants[<variant>]` preset (MoW
ablations; a scale preset may adapt a variant's values under its own `variants:`, never add
one) -> the run's suite block (`suites.<suite>.train` / `.warmup`, e.g. Meta-World's 300k
steps per task, merged over `train:` / `warmup:`) -> `--set key=value` overrides. The
result is checked against `workflow/schemas/params.schema.yaml` (the same schema the
Snakefile validates with) plus the cross-key rules the schema cannot express. Every
failure is a `ConfigError` whose one-line message names the file and the key path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "params.schema.yaml"
DEFAULT_PARAMS = Path("params.yaml")  # relative to the working directory, like Snakemake's configfile
RUNTIME_ONLY_KEYS = ("device", "threads", "compile")  # under train.*: how a run executes, not what it computes


class ConfigError(ValueError):
    """A bad parameter file, key or value; the message is one line naming the culprit."""


@lru_cache(maxsize=1)
def _schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"schema file missing: {SCHEMA_PATH}")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path} (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: Mapping) -> dict:
    """Recursively merge `update` into a copy of `base` (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _path_str(parts: Iterable) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _schema_errors(tree: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    messages = []
    for err in sorted(validator.iter_errors(tree), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            extra = sorted(k for k in err.instance if k not in allowed)
            messages.append(f"unknown key '{_path_str(path + extra[:1])}'"
                            + (f" (valid: {', '.join(sorted(allowed))})" if allowed else ""))
        else:
            messages.append(f"{_path_str(path)}: {err.message}")
    return messages


def _semantic_errors(tree: dict) -> list[str]:
    """Cross-key rules the JSON schema cannot express."""
    errs = []
    if tree["protocol"] not in tree["protocols"]:
        errs.append(f"protocol: unknown protocol '{tree['protocol']}' (valid: {', '.join(tree['protocols'])})")
    wm, ag, tr = tree["model"]["world_model"], tree["model"]["agent"], tree["train"]
    if wm["d_model"] % wm["heads"]:
        errs.append(f"model.world_model.heads: {wm['heads']} does not divide d_model {wm['d_model']}")
    if ag["percentile_low"] >= ag["percentile_high"]:
        errs.append("model.agent.percentile_low: must be below percentile_high")
    for key in ("wm_seq_len", "act_context"):
        if tr[key] > wm["max_len"]:
            errs.append(f"train.{key}: {tr[key]} exceeds model.world_model.max_len {wm['max_len']}")
    if tr["imag_context"] + tr["imag_horizon"] > wm["max_len"]:
        errs.append(f"train.imag_horizon: imag_context + imag_horizon = {tr['imag_context'] + tr['imag_horizon']} "
                    f"exceeds model.world_model.max_len {wm['max_len']}")
    mow = tree["model"]["mow"]
    if mow["top_k"] > mow["num_experts"]:
        errs.append(f"model.mow.top_k: {mow['top_k']} exceeds model.mow.num_experts {mow['num_experts']}")
    for part in ("expert", "shared"):
        if mow[f"{part}_d_model"] % mow[f"{part}_heads"]:
            errs.append(f"model.mow.{part}_heads: {mow[f'{part}_heads']} does not divide {part}_d_model {mow[f'{part}_d_model']}")
    if not (mow["use_experts"] or mow["use_shared"]):
        errs.append("model.mow.use_shared: use_experts and use_shared cannot both be false")
    if tr["warmup_steps"] >= tr["env_steps"]:
        errs.append(f"train.warmup_steps: {tr['warmup_steps']} must be below train.env_steps {tr['env_steps']}")
    if tr["wm_seq_len"] * tr["num_envs"] > tr["buffer_capacity"]:
        errs.append(f"train.buffer_capacity: {tr['buffer_capacity']} cannot hold one sequence of wm_seq_len {tr['wm_seq_len']}")
    for name, proto in tree["protocols"].items():
        if proto["image_size"] != wm["image_size"]:
            errs.append(f"protocols.{name}.image_size: {proto['image_size']} differs from model.world_model.image_size {wm['image_size']}")
        if proto["suite"] not in tree["suites"]:
            errs.append(f"protocols.{name}.suite: suite '{proto['suite']}' has no entry under suites")
    return errs


def _check(tree: dict, source: str) -> None:
    errs = _schema_errors(tree)
    if not errs:
        errs = _semantic_errors(tree)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ConfigError(f"{source}: {errs[0]}{more}")


_PLAIN_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.env_steps=5000` -> (['train', 'env_steps'], 5000); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.env_steps=5000")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    if isinstance(value, str) and _PLAIN_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-3` and `1.0e30` as strings; on a command line they are numbers
    return key.strip().split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--set {'.'.join(parts)}: unknown key '{'.'.join(parts[: i + 1])}'")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"--set {'.'.join(parts)}: unknown key '{'.'.join(parts)}'")
    node[parts[-1]] = value


SUITE_BLOCKS = ("train", "warmup")  # sections a suite may override for its own runs


def apply_suite(tree: dict, suite: str) -> dict:
    """`tree` with `suites.<suite>.train` / `.warmup` merged over `train:` / `warmup:`."""
    if suite not in tree["suites"]:
        raise ConfigError(f"unknown suite '{suite}' (valid: {', '.join(tree['suites'])})")
    out = copy.deepcopy(tree)
    for key in SUITE_BLOCKS:
        out[key] = deep_merge(out[key], out["suites"][suite].get(key, {}))
    return out


def resolve(raw: dict, *, scale: str | None = None, overrides: Iterable[str] = (), source: str = "params.yaml",
            variant: str = "full", suite: str | None = None, check_presets: bool = True) -> dict:
    """Validate the raw file and every preset, then return the resolved tree (for runs of
    `suite` when given: its train/warmup block applied). `check_presets=False` skips the
    presets' validation (most of the time) when the caller has just resolved the same file."""
    _check(raw, source)
    for name, preset in (raw["scales"].items() if check_presets else ()):
        added = [v for v in (preset.get("variants") or {}) if v not in raw["variants"]]
        if added:
            raise ConfigError(f"{source}: scales.{name}.variants.{added[0]}: not a variant of `variants:` "
                              f"(valid: {', '.join(raw['variants'])})")
        merged = deep_merge(raw, preset)
        try:
            _check(merged, source)
            for suite_name in merged["suites"]:
                _check(apply_suite(merged, suite_name), f"{source} (suite {suite_name})")
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"{source}", f"{source}: scales.{name}", 1)) from None
        for vname, vpreset in merged["variants"].items():  # a scale may adapt a variant (smoke's sweeps)
            try:
                _check(deep_merge(merged, vpreset), source)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace(f"{source}: ", f"{source}: variants.{vname} (scale {name}): ", 1)) from None
    if variant not in raw["variants"]:  # a scale preset adapts variants, it adds none (checked below)
        raise ConfigError(f"{source}: variant: unknown variant '{variant}' (valid: {', '.join(raw['variants'])})")
    parsed = [parse_override(o) for o in overrides]
    for parts, value in parsed:
        if parts == ["scale"]:
            scale = value
    scale = scale if scale is not None else raw["scale"]
    if scale not in raw["scales"]:
        raise ConfigError(f"{source}: scale: unknown scale '{scale}' (valid: {', '.join(raw['scales'])})")
    scaled = deep_merge(raw, raw["scales"][scale])
    tree = deep_merge(scaled, scaled["variants"][variant])
    tree["scale"] = scale
    # Overrides go in before the suite block (so `--set suites.metaworld.train.x=...` counts)
    # and again after it (so `--set train.x=...` wins over the suite's value).
    for parts, value in parsed:
        if parts != ["scale"]:
            _apply_override(tree, parts, value)
    if suite is not None:
        tree = apply_suite(tree, suite)
        for parts, value in parsed:
            if parts != ["scale"]:
                _apply_override(tree, parts, value)
    _check(tree, f"{source} (scale={scale}{f', variant={variant}' if variant != 'full' else ''}"
                 f"{f', suite={suite}' if suite else ''}{', with --set overrides' if parsed else ''})")
    return tree


def freeze(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return _FrozenDict({k: freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(freeze(v) for v in obj)
    return obj


class _FrozenDict(dict):
    """A dict that refuses mutation, so nothing changes the config mid-run."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("configuration is frozen")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore

    def __reduce__(self):
        # pickle (a `mow bench` worker process gets the params) would fill it item by item
        return (_FrozenDict, (dict(self),))


def _thaw(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_thaw(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Params:
    """The resolved, validated, immutable parameter tree."""

    tree: Mapping
    source: str

    def __getitem__(self, key: str) -> Any:
        return self.tree[key]

    @property
    def scale(self) -> str:
        return self.tree["scale"]

    def to_dict(self) -> dict:
        return _thaw(self.tree)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved tree, less the keys that only say
        where a run executes (device, threads), so a run may resume on another machine."""
        tree = self.to_dict()
        for key in RUNTIME_ONLY_KEYS:
            tree["train"].pop(key, None)
        blob = json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def tasks(self, suite: str) -> tuple[str, ...]:
        if suite not in self.tree["suites"]:
            raise ConfigError(f"unknown suite '{suite}' (valid: {', '.join(self.tree['suites'])})")
        return tuple(self.tree["suites"][suite]["tasks"])

    def protocol(self, name: str | None = None) -> Mapping:
        name = name or self.tree["protocol"]
        if name not in self.tree["protocols"]:
            raise ConfigError(f"unknown protocol '{name}' (valid: {', '.join(self.tree['protocols'])})")
        return self.tree["protocols"][name]

    def world_model_config(self):
        from mow.models.world_model import WorldModelConfig

        wm = self.to_dict()["model"]["world_model"]
        wm["encoder_channels"] = tuple(wm["encoder_channels"])
        return WorldModelConfig(**wm)

    def agent_config(self):
        from mow.models.actor_critic import AgentConfig

        return AgentConfig(**self.to_dict()["model"]["agent"])

    def mow_config(self, num_tasks: int):
        from mow.models.mow_world_model import MoWConfig

        mow = self.to_dict()["model"]["mow"]
        mow.pop("clustering")  # how clusters are found, not part of the model
        return MoWConfig(world=self.world_model_config(), num_tasks=num_tasks, **mow)


# What only the cluster step and the joint training read: the warm-up model has a single
# cluster (mow/warmup.py). Variants whose resolved parameters differ in nothing else share one
# warm-up model, so the clustering ablation and the cluster sweeps start from the same
# pretrained weights as the full variant at the paper scale and differ from it in the clusters
# alone (and 30 paper-scale pretrainings are not run).
CLUSTER_ONLY_KEYS = (("model", "mow", "num_clusters"), ("model", "mow", "clustering"),
                     ("warmup", "cluster_batches"), ("warmup", "cluster_batch"))


def warmup_owners(params: str | Path | dict | None = None, *, scale: str | None = None,
                  overrides: Iterable[str] = (), suite: str | None = None) -> dict[str, str]:
    """{variant: the variant whose warm-up model (``warmup/pretrain.ckpt``) it trains from}:
    the first variant in ``variants:`` order whose resolved parameters equal its own once
    CLUSTER_ONLY_KEYS are removed (itself when none does). `params`: a file or its raw tree."""
    raw = params if isinstance(params, dict) else _read_yaml(Path(params) if params else DEFAULT_PARAMS)
    source = "params.yaml" if isinstance(params, dict) else str(params or DEFAULT_PARAMS)
    owners: dict[str, str] = {}
    by_signature: dict[str, str] = {}
    for i, variant in enumerate(raw["variants"]):
        try:
            tree = resolve(raw, scale=scale, overrides=overrides, source=source, variant=variant, suite=suite,
                           check_presets=i == 0)
        except ConfigError:
            if i == 0:
                raise
            # valid on its own, but an override (say top_k=4) breaks it: it shares with no one,
            # and its own runs report the error
            owners[variant] = variant
            continue
        for *path, key in CLUSTER_ONLY_KEYS:
            node = tree
            for part in path:
                node = node[part]
            node.pop(key, None)
        owners[variant] = by_signature.setdefault(json.dumps(tree, sort_keys=True), variant)
    return owners


def load_params(path: str | Path | None = None, *, scale: str | None = None, overrides: Iterable[str] = (),
                variant: str = "full", suite: str | None = None) -> Params:
    path = Path(path) if path else DEFAULT_PARAMS
    tree = resolve(_read_yaml(path), scale=scale, overrides=overrides, source=str(path), variant=variant,
                   suite=suite)
    return Params(tree=freeze(tree), source=str(path))
