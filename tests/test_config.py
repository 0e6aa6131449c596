"""params.yaml loading: presets, overrides, and one-line errors naming the key path."""

from __future__ import annotations

import pickle

import pytest
import yaml

from mow.config import ConfigError, load_params, warmup_owners

from conftest import PARAMS


def test_scale_presets_apply_on_top_of_the_paper_defaults():
    paper = load_params(PARAMS, scale="paper")
    smoke = load_params(PARAMS, scale="smoke")
    assert paper["train"]["env_steps"] == 102000 and paper["model"]["world_model"]["d_model"] == 512
    assert smoke["train"]["env_steps"] < 5000 and smoke["model"]["world_model"]["d_model"] < 512
    # a preset changes widths and budgets only where it says so
    assert smoke["model"]["agent"]["gamma"] == paper["model"]["agent"]["gamma"] == 0.985
    assert paper.tasks("atari")[:3] == ("Alien", "Amidar", "Assault") and len(paper.tasks("atari")) == 26
    assert smoke.digest() != paper.digest()


def test_overrides_are_parsed_as_yaml_and_win_over_the_preset():
    p = load_params(PARAMS, scale="smoke", overrides=["train.env_steps=777", "model.agent.lambda_form=paper",
                                                      "seeds=[3, 4]"])
    assert p["train"]["env_steps"] == 777 and p["model"]["agent"]["lambda_form"] == "paper" and p["seeds"] == (3, 4)
    assert load_params(PARAMS, overrides=["scale=paper"]).scale == "paper"


def test_resolved_config_is_frozen():
    p = load_params(PARAMS)
    with pytest.raises(TypeError):
        p["train"]["env_steps"] = 5
    assert p.to_dict()["train"]["env_steps"] == p["train"]["env_steps"]


def test_resolved_config_survives_pickling_still_frozen():
    # `mow bench` hands the params to a worker process of each method
    params = load_params(PARAMS, scale="smoke")
    copy = pickle.loads(pickle.dumps(params))
    assert copy.digest() == params.digest() and copy["train"]["wm_batch"] == params["train"]["wm_batch"]
    with pytest.raises(TypeError, match="frozen"):
        copy["train"]["wm_batch"] = 1


def test_digest_ignores_where_a_run_executes_but_not_what_it_computes():
    base = load_params(PARAMS)
    assert load_params(PARAMS, overrides=["train.threads=1", "train.device=cpu"]).digest() == base.digest()
    assert load_params(PARAMS, overrides=["train.wm_lr=0.001"]).digest() != base.digest()


@pytest.mark.parametrize("override, named", [
    (["train.env_steps=-5"], "train.env_steps"),
    (["train.env_stepz=5"], "train.env_stepz"),
    (["train.wm_lr=fast"], "train.wm_lr"),
    (["scale=huge"], "scale"),
    (["seeds=[]"], "seeds"),
    (["suites.atari.tasks=[Pong, Pongg]"], "suites.atari.tasks.1"),
    (["protocol=nope"], "protocol"),
    (["model.world_model.heads=3"], "model.world_model.heads"),
    (["model.agent.lambda_form=weird"], "model.agent.lambda_form"),
    (["train.imag_horizon=100"], "train.imag_horizon"),
    (["train.warmup_steps=999999"], "train.warmup_steps"),
    (["protocols.storm_compat.sticky_prob=1.5"], "protocols.storm_compat.sticky_prob"),
    (["train.device=gpu"], "train.device"),
    (["noequals"], "noequals"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, overrides=override)
    msg = str(err.value)
    assert named in msg and "\n" not in msg


def test_bad_file_edits_name_the_key(tmp_path):
    raw = yaml.safe_load(PARAMS.read_text())
    raw["train"]["bogus"] = 1
    raw["scales"]["smoke"]["model"]["agent"]["hiddenn"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key 'train\.bogus'"):
        load_params(path)
    del raw["train"]["bogus"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"scales\.smoke: unknown key 'model\.agent\.hiddenn'"):
        load_params(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_variants_differing_only_in_the_clustering_share_one_warmup_model():
    """At the paper scale the clustering ablation and the cluster sweeps differ from `full` only
    in what the cluster step and the training read, so they train from full's warm-up model;
    every other variant changes the warm-up model or its loss and pretrains its own."""
    paper = warmup_owners(PARAMS, scale="paper", suite="atari")
    shared = {"no_clustering", "single_vae", "clusters_3", "clusters_6", "clusters_9", "clusters_12"}
    assert {v for v, owner in paper.items() if owner != v} == shared and set(paper[v] for v in shared) == {"full"}
    assert all(paper[v] == v for v in paper if v not in shared)
    # at smoke the ablations run a smaller budget than full (so none shares full's), and
    # experts_3 equals the smoke default of 3 experts: it joins the clustering group
    smoke = warmup_owners(PARAMS, scale="smoke", suite="atari")
    assert smoke["full"] == "full" and smoke["experts_3"] == smoke["single_vae"] == "no_clustering"
    assert smoke["no_task_loss"] == "no_task_loss" and smoke["experts_6"] == "experts_6"
    # an override of a warm-up key splits the group; one of a cluster-only key does not
    raw = yaml.safe_load(PARAMS.read_text())
    raw["variants"]["clusters_3"] = {"model": {"mow": {"num_clusters": 3}}, "warmup": {"pretrain_steps": 7}}
    raw["variants"]["clusters_6"] = {"model": {"mow": {"num_clusters": 6, "clustering": "random"}},
                                     "warmup": {"cluster_batches": 3}}
    owners = warmup_owners(raw, scale="paper", suite="atari")
    assert owners["clusters_3"] == "clusters_3" and owners["clusters_6"] == "full"
    # an override that breaks another variant (top_k 4 > experts_3's 3 experts) leaves it alone
    owners = warmup_owners(PARAMS, scale="paper", suite="atari", overrides=["model.mow.top_k=4"])
    assert owners["experts_3"] == "experts_3" and owners["single_vae"] == "full"
