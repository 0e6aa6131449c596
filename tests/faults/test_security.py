"""Nothing from disk is trusted to run code, and nothing is served beyond localhost.

Static checks over the package source (every `torch.load` passes weights_only=True, YAML is
only read with the safe loader, no pickle of our own files), one real malicious checkpoint
fed to the `mow` entry point (tests/test_checkpoint.py
`test_a_payload_with_code_is_refused_even_with_a_valid_checksum` covers the loader itself),
and the MLflow UI/server commands of the Makefile and README bound to 127.0.0.1."""

from __future__ import annotations

import ast
import hashlib
import os
import pickle
import re
from pathlib import Path

from mow import checkpoint

from faultkit import in_tmp, mow_cli  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "mow").rglob("*.py"))
# Loaders that can build arbitrary Python objects from a file's contents.
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all", "Loader",
               "FullLoader", "UnsafeLoader"}
# The one pickle load in the package: metaworld's own in-memory task records (metaworld.Task.data
# is a pickle by metaworld's design), never bytes read from a file of ours.
PICKLE_ALLOWED = {("mow/envs/metaworld.py", "generate_mt50_goals")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _calls(path: Path):
    """(dotted callee, call node, enclosing function name) of every call in a source file."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                yield _dotted(child.func), child, function
            yield from walk(child, inner)

    yield from walk(tree, "<module>")


def test_every_torch_load_in_the_package_passes_weights_only_true():
    loads = []
    for path in SOURCES:
        text = path.read_text()
        # `torch.load` is the only spelling: no bare `load` imported from torch, no other unpickling loader
        assert not re.search(r"from torch(\.serialization)? import [^\n]*\bload\b", text), path
        assert "torch.jit.load" not in text and "torch.package" not in text, path
        for name, call, _ in _calls(path):
            if name == "torch.load":
                flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: torch.load without weights_only=True"
                loads.append(where)
    assert loads, "no torch.load found: the scan looks at the wrong files"


def test_yaml_is_read_only_with_the_safe_loader_and_nothing_of_ours_is_unpickled():
    safe = 0
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"from yaml import", text), f"{path}: import yaml, call yaml.safe_load"
        for name, call, function in _calls(path):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            assert not (name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML), f"{where}: {name}"
            safe += name == "yaml.safe_load"
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "dill.load", "dill.loads"):
                assert (str(path.relative_to(REPO)), function) in PICKLE_ALLOWED, f"{where}: {name} in {function}"
            if name in ("np.load", "numpy.load"):
                flag = {k.arg: k.value for k in call.keywords}.get("allow_pickle")
                assert isinstance(flag, ast.Constant) and flag.value is False, f"{where}: np.load may unpickle"
        for attr in re.findall(r"yaml\.(\w+)", text):
            assert attr not in UNSAFE_YAML, f"{path}: yaml.{attr}"
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]:  # not plain Python: by text
        assert not re.search(r"yaml\.(load|full_load|unsafe_load)\b|pickle\.loads?\(", path.read_text()), path
    assert safe >= 2, "no yaml.safe_load found: the scan looks at the wrong files"


class _Payload:
    """Unpickling this runs os.mkdir(marker): harmless, and visible."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_model_file_carrying_code_is_refused_by_mow_evaluate_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"format": 1, "world_model": _Payload(marker)}, protocol=2)  # torch.save's protocol
    pickle.loads(payload)  # the payload is live: plain unpickling runs it ...
    assert marker.is_dir()
    marker.rmdir()
    evil = tmp_path / "model.ckpt"  # ... behind a valid header and checksum, as a forger would write it
    evil.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).digest() + payload)
    code, _, err = mow_cli(["evaluate", "--model", str(evil), "--out", str(tmp_path / "raw.json"), "--no-track"])
    assert code == 2, err
    assert err.strip() == f"mow: error: {evil}: payload rejected by the safe loader (UnpicklingError)", err
    assert not marker.exists() and not (tmp_path / "raw.json").exists()


def _commands(text: str) -> list[str]:
    """Every `mlflow ui` / `mlflow server` command line in fenced blocks or inline code."""
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    lines = [line.strip() for span in spans for line in span.splitlines()]
    return [line for line in lines if re.match(r"(\S*/)?mlflow (ui|server)\b", line)]


def test_mlflow_ui_and_server_commands_bind_to_localhost_only():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe, "Makefile has no ui target"
    served = [line for line in recipe.group(1).splitlines() if re.search(r"mlflow (ui|server)\b", line)]
    assert served and all("--host 127.0.0.1" in line for line in served), served
    readme = (REPO / "README.md").read_text()
    commands = _commands(readme)
    assert len(commands) >= 2, commands
    for command in commands:
        assert "--host 127.0.0.1" in command, f"README.md: `{command}` must bind to 127.0.0.1"
    assert "0.0.0.0" not in "".join(re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S))
