"""The package is the library: shipped configs by name, entry points only in the CLI, the test
helpers in `hfjax.testing`, the benchmark free of the checkout (the wheel itself: .ci/run)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfjax import cli
from hfjax.config import config_to_dict, load_config
from hfjax.config_names import ConfigNameError, resolve_config_name, shipped_config_names
from hfjax.errors import UserError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PAPER_EXP = "single_source_qwen_to_llama/mit-movie"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_package_list_is_the_tree_and_configs_live_under_hfjax():
    st = _pyproject()["tool"]["setuptools"]
    tree = {str(p.parent.relative_to(REPO)).replace(os.sep, ".")
            for top in ("hfjax", "bridge") for p in (REPO / top).rglob("__init__.py")
            if "__pycache__" not in p.parts}
    assert set(st["packages"]) == tree | {"hfjax.configs"}
    assert "configs" not in st["packages"]
    assert st["package-dir"] == {"hfjax.configs": "configs"}
    assert (REPO / "configs" / "__init__.py").is_file()


def test_hfjax_configs_is_the_checkouts_configs_folder():
    import hfjax.configs.fuse
    import hfjax.configs.paper

    assert Path(hfjax.configs.fuse.__file__) == REPO / "configs" / "fuse.py"
    assert hfjax.configs.paper.fuse is hfjax.configs.fuse  # one schema module, not two


def test_no_code_imports_a_top_level_configs_package():
    offenders = []
    for top in ("hfjax", "bridge", "configs", "scripts", "tests"):
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "configs" or n.startswith("configs.") for n in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_resolve_config_name():
    configs = REPO / "configs"
    assert resolve_config_name("hfjax:fuse") == str(configs / "fuse.py")
    assert resolve_config_name("hfjax:train_lora") == str(configs / "train_lora.py")
    assert resolve_config_name(f"hfjax:paper:{PAPER_EXP}") == f"{configs / 'paper.py'}:{PAPER_EXP}"
    assert resolve_config_name("hfjax:original_example") == str(configs / "original_example.yaml")
    for plain in ("configs/fuse.py", "run.py:arg", "x.yaml", "/abs/hfjax:fuse.py"):
        assert resolve_config_name(plain) == plain
    assert shipped_config_names() == ["fuse", "original_example", "paper", "train_lora"]
    with pytest.raises(ConfigNameError, match=r"^hfjax:nope: no shipped config 'nope'; "
                                              r"shipped: fuse, original_example, paper"):
        resolve_config_name("hfjax:nope")
    with pytest.raises(ConfigNameError, match="takes no argument"):
        resolve_config_name("hfjax:original_example:x")
    for bad in ("hfjax:", "hfjax:../configs/fuse", "hfjax:__init__"):
        with pytest.raises(UserError):
            resolve_config_name(bad)


def test_shipped_name_loads_the_same_config_as_the_file():
    by_name = load_config(resolve_config_name(f"hfjax:paper:{PAPER_EXP}"))
    by_file = load_config(f"{REPO}/configs/paper.py:{PAPER_EXP}")
    assert [config_to_dict(c) for c in by_name] == [config_to_dict(c) for c in by_file]


def test_cli_takes_shipped_names(capsys):
    assert cli.main(["fuse", "--config", "hfjax:fuse", "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "target.model_path='': must be set" in err and "no such" not in err
    assert cli.main(["fuse", "--config", "hfjax:fusee"]) == 2
    assert "hfjax:fusee: no shipped config 'fusee'" in capsys.readouterr().err
    assert cli.main(["train-lora", "--config", "hfjax:train_lora"]) == 2
    assert "must be set" in capsys.readouterr().err


LIBRARY_MODULES = ("hfjax/bench.py", "hfjax/memory.py", "hfjax/eval/run.py",
                   "hfjax/demo/pipeline.py", "hfjax/training/lora_train.py")


@pytest.mark.parametrize("path", LIBRARY_MODULES)
def test_library_modules_have_no_entry_point(path):
    tree = ast.parse((REPO / path).read_text())
    assert not [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "argparse" not in imports


def test_cli_has_every_command():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"fuse", "train-lora", "eval", "demo", "bench", "memory", "study",
                                "lora-from-delta", "merge-full",
                                "tiny-zoo"}


def test_bench_workers_see_the_package_not_tests():
    from hfjax import bench

    parts = bench._env("default")["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(Path(bench.__file__).resolve().parents[1])
    assert not any(Path(p).name == "tests" for p in parts if p)
    assert "sys.path" not in (REPO / "hfjax" / "bench.py").read_text()


def test_bench_takes_the_paper_hyper_parameters_from_the_fuse_config(monkeypatch):
    from hfjax.configs import fuse

    from hfjax import bench

    c = bench.CONFIGS["small"]
    cfg = bench.paper_defaults(c)
    assert (cfg.fusion.block_size, cfg.fusion.embed_dim, cfg.rdm.num_projections) == (
        c.block, c.embed, c.projections)
    original = fuse.get_config

    def changed():
        cfg = original()
        cfg.train.lr = 1.25e-3
        return cfg

    monkeypatch.setattr(fuse, "get_config", changed)
    assert bench.paper_defaults(c).train.lr == 1.25e-3
    with pytest.raises(bench.BenchError, match="unknown configuration.*huge; known: small"):
        bench.run_bench(["huge"])


@pytest.mark.parametrize("module", ["hfjax.testing.torch_reference", "hfjax.testing.hf_models"])
def test_testing_helpers_say_when_torch_is_missing(module):
    code = ("import sys; sys.modules['torch'] = None\n"
            f"import {module} as m\n"
            "if hasattr(m, 'make_hf_model'): m.make_hf_model('llama', 'x')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: hfjax.testing.") and "needs torch" in last, last


def test_tiny_zoo_then_fuse_dry_run_by_name(tmp_path, capsys):
    assert cli.main(["tiny-zoo", str(tmp_path / "zoo")]) == 0
    out = capsys.readouterr().out
    flags = (tmp_path / "zoo" / "fuse_flags.txt").read_text().splitlines()
    assert f"fuse_flags: {tmp_path / 'zoo' / 'fuse_flags.txt'}" in out
    assert "--config.target.model_path=" + str(tmp_path / "zoo" / "base_llama") in flags
    assert cli.main(["fuse", "--config", "hfjax:fuse", "--dry_run", *flags]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps: 24" in out and "total" in out
