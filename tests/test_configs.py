"""Configs: the fuse schema, the paper's experiments, the original's YAML, overrides, sweeps."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest
from hfjax.configs import fuse, paper

from hfjax import config as hfjax_config
from hfjax.config import ConfigError, apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
FUSE_PY = REPO / "configs" / "fuse.py"
EXAMPLE_YAML = REPO / "configs" / "original_example.yaml"
RUN_SWEEP = REPO / "scripts" / "run_sweep.py"
PATH_VARS = ("MODEL_ROOT", "ADAPTER_ROOT", "DATA_ROOT", "OUTPUT_ROOT")

# docs/algorithm.md §9's shared training block (+ the defaults docs/algorithm.md §3-§7 fix).
SHARED_BLOCK = {
    "fusion.embed_dim": 1024,
    "fusion.num_heads": 8,
    "fusion.max_pos": 4096,
    "fusion.block_size": 4096,
    "fusion.alpha_init": 0.3,
    "fusion.mu_gate": 0.1,
    "fusion.transfer_ratio": 1.0,
    "fusion.gate": "svd",
    "fusion.layer_alignment": "tail",
    "fusion.update_mode": "b_only",
    "fusion.zero_sources": False,
    "rdm.lambda_reg": 0.005,
    "rdm.mu_target": 0.0,
    "rdm.sigma_target": 1.0,
    "rdm.num_projections": 2048,
    "rdm.activation": "relu",
    "train.epochs": 3,
    "train.lr": 5e-5,
    "train.grad_accum": 8,
    "train.batch_size": 1,
    "train.warmup_ratio": 0.05,
    "train.weight_decay": 0.01,
    "train.b1": 0.9,
    "train.b2": 0.999,
    "train.eps": 1e-8,
    "train.max_steps": -1,
    "data.cutoff_len": 1024,
    "seed": 42,
}
ALPHAS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75,
          0.8, 0.85, 0.9]
MU_GATES = [-0.05, -0.1, -0.15, -0.2, -0.3, -0.4, 0.05, 0.1, 0.15]
UIE = ["TweetNER7_sample_15000_sample300", "ET_FindVehicle_sample300", "RE_conll04_sample300",
       "RE_New-York-Times-RE_sample_30000_sample300", "ET_FabNER_sample300",
       "mit-movie_sample300"]


def get(cfg: ml_collections.ConfigDict, path: str):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def leaves(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """MODEL_ROOT, ADAPTER_ROOT, DATA_ROOT, OUTPUT_ROOT under tmp_path."""
    paths = {}
    for var in PATH_VARS:
        paths[var] = str(tmp_path / var.lower())
        monkeypatch.setenv(var, paths[var])
    return paths


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL_YAML = textwrap.dedent("""\
    output_dir: ${OUTPUT_ROOT}/run
    base_model_path: ${MODEL_ROOT}/llama
    initial_target_lora: ${ADAPTER_ROOT}/target
    data_global:
      dataset_dir: ${DATA_ROOT}
      template: llama3
      batch_size: 1
    tasks:
    - task_name: one
      source_lora_paths:
      - ${ADAPTER_ROOT}/qwen/a
      - ${ADAPTER_ROOT}/qwen/b
      datasets:
      - {name: ds_main, type: main}
      - {name: ds_replay, type: replay, ratio: all}
      training:
        num_epochs: 3
        %s
    """)


def minimal_yaml(tmp_path: Path, training: str = "lr: 1.0e-4", name: str = "run.yaml") -> Path:
    return write(tmp_path / name, MINIMAL_YAML % training)


# --------------------------------------------------------------------------- fuse.py


def test_every_fuse_field_has_a_comment():
    source = FUSE_PY.read_text()
    lines = source.splitlines()
    commented, uncommented = set(), []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign) or not isinstance(node.targets[0], ast.Attribute):
            continue
        parts, target = [], node.targets[0]
        while isinstance(target, ast.Attribute):
            parts.insert(0, target.attr)
            target = target.value
        if not (isinstance(target, ast.Name) and target.id == "config"):
            continue
        path = ".".join(parts)
        above = lines[node.lineno - 2].strip()
        if above.startswith("#") or "#" in lines[node.lineno - 1]:
            commented.add(path)
        else:
            uncommented.append(path)
    assert not uncommented, f"fields without a comment: {uncommented}"
    cfg = fuse.get_config()
    fields = set(leaves(cfg))
    sections = {k for k in cfg.keys() if isinstance(cfg[k], ml_collections.ConfigDict)}
    assert fields | sections <= commented, f"not assigned with a comment: {fields - commented}"


def test_fuse_defaults_are_the_papers_shared_block():
    cfg = fuse.get_config()
    for path, value in SHARED_BLOCK.items():
        assert get(cfg, path) == value, path
        assert type(get(cfg, path)) is type(value), path


def test_fuse_default_needs_paths_but_is_otherwise_valid():
    with pytest.raises(ConfigError) as e:
        validate_config(fuse.get_config(), check_paths=False)
    fields = {p.split("=")[0] for p in e.value.problems}
    assert fields == {"target.model_path", "target.adapter_path", "sources", "data.data_root",
                      "data.datasets"}


# --------------------------------------------------------------------------- paper.py


def test_list_experiments_has_49_unique_names():
    names = paper.list_experiments()
    assert len(names) == 49 and len(set(names)) == 49
    groups = {}
    for name in names:
        groups[name.split("/")[0]] = groups.get(name.split("/")[0], 0) + 1
    assert groups == {"single_source_qwen_to_llama": 6, "multi_source_cross_family": 2,
                      "noise_robustness": 1, "glue_cross_family": 10, "sensitivity_alpha": 18,
                      "sensitivity_mu_gate": 9, "ablation": 3}


@pytest.mark.parametrize("name", paper.list_experiments())
def test_every_paper_config_builds_and_validates(name, roots):
    (cfg,) = load_config(f"{REPO}/configs/paper.py:{name}")
    validate_config(cfg, check_paths=False)
    assert cfg.output_dir == os.path.join(roots["OUTPUT_ROOT"], "paper", name)
    assert cfg.target.model_path.startswith(roots["MODEL_ROOT"])
    assert all(s.adapter_path.startswith(roots["ADAPTER_ROOT"]) for s in cfg.sources)
    assert cfg.data.data_root.startswith(roots["DATA_ROOT"])
    swept = {"sensitivity_alpha": "fusion.alpha_init", "sensitivity_mu_gate": "fusion.mu_gate",
             "ablation": {"no_denoising": "fusion.gate", "no_rdm": "rdm.lambda_reg",
                          "zero_sources": "fusion.zero_sources"}}.get(name.split("/")[0])
    if isinstance(swept, dict):
        swept = swept[name.split("/")[1]]
    for path, value in SHARED_BLOCK.items():
        if path != swept:
            assert get(cfg, path) == value, (name, path)


def test_sensitivity_values_are_exact():
    alphas = [paper.get_config(f"sensitivity_alpha/{a:g}").fusion.alpha_init for a in ALPHAS]
    assert alphas == ALPHAS
    mus = [paper.get_config(f"sensitivity_mu_gate/{m:g}") for m in MU_GATES]
    assert [c.fusion.mu_gate for c in mus] == MU_GATES
    assert all(c.fusion.alpha_init == 0.3 for c in mus)
    assert [n.split("/")[1] for n in paper.list_experiments() if n.startswith("sensitivity_mu")] \
        == ["-0.05", "-0.1", "-0.15", "-0.2", "-0.3", "-0.4", "0.05", "0.1", "0.15"]
    # Apart from the swept value and where it writes, a sweep point is the mit-movie run.
    base = leaves(paper.get_config("single_source_qwen_to_llama/mit-movie"))
    point = leaves(paper.get_config("sensitivity_alpha/0.05"))
    differ = {k for k in base if base[k] != point[k]}
    assert differ == {"fusion.alpha_init", "output_dir", "task_name", "experiment_name"}


def test_paper_targets_sources_and_replay_follow_the_original(roots):
    ad = roots["ADAPTER_ROOT"]
    cfg = paper.get_config("single_source_qwen_to_llama/mit-movie")
    assert cfg.target.adapter_path == f"{ad}/llama_instruct/NER_mit-movie_sft"
    assert cfg.target.model_path == f"{roots['MODEL_ROOT']}/llama-3.1-8b-instruct"
    assert cfg.target.template == "llama3"
    assert [s.adapter_path for s in cfg.sources] == [
        f"{ad}/Qwen2.5/UIE/{n}" for n in ("RE_New-York-Times-RE_sample_30000", "RE_conll04",
                                          "NER_TweetNER7_sample_15000", "ET_FabNER",
                                          "ET_FindVehicle")]
    assert list(cfg.data.datasets) == UIE
    assert cfg.task_name == "single_source_transfer"
    tweet = paper.get_config("single_source_qwen_to_llama/tweetner7")
    assert [s.name for s in tweet.sources] == ["qwen_nyt", "qwen_conll04", "qwen_fabner",
                                               "qwen_findvehicle", "qwen_mit-movie"]
    qwen = paper.get_config("multi_source_cross_family/qwen_target_llama_mistral")
    assert qwen.target.template == "qwen"
    assert [s.name for s in qwen.sources] == ["llama_tweetner7", "llama_conll04", "llama_nyt",
                                              "mistral_fabner", "mistral_findvehicle"]
    noise = paper.get_config("noise_robustness")
    assert len(noise.sources) == 9
    assert noise.sources[-1].adapter_path == f"{ad}/llama_instruct/NER_bc2gm"
    glue = paper.get_config("glue_cross_family/qwen/cola")
    assert glue.target.adapter_path == f"{ad}/glue/Qwen2.5/cola_qa_train"
    assert [s.adapter_path for s in glue.sources] == [
        f"{ad}/glue/llama3/{t}_qa_train" for t in ("mrpc", "qnli", "rte", "sst2")]
    assert list(glue.data.datasets) == ["glue_merged"]
    assert paper.get_config("ablation/no_denoising").fusion.gate == "open"
    assert paper.get_config("ablation/zero_sources").fusion.zero_sources is True
    assert paper.get_config("ablation/no_rdm").rdm.lambda_reg == 0.0


def test_paper_defaults_without_env(monkeypatch):
    for var in PATH_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = paper.get_config("noise_robustness")
    assert cfg.target.model_path == "./models/llama-3.1-8b-instruct"
    assert cfg.data.data_root == "./data/uie_sample300"
    assert cfg.output_dir == "./outputs/paper/noise_robustness"


def test_unknown_paper_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sensitivity_alpha/0.05'"):
        load_config(f"{REPO}/configs/paper.py:sensitivity_alpha/0.050")
    with pytest.raises(ConfigError, match="needs an experiment name"):
        load_config(f"{REPO}/configs/paper.py")


# --------------------------------------------------------------------------- original YAML


def test_example_yaml_translates_with_env_and_chaining(roots):
    first, second = load_config(EXAMPLE_YAML)
    out = f"{roots['OUTPUT_ROOT']}/example_chained_fusion"
    ad = roots["ADAPTER_ROOT"]
    assert first.task_name == "qwen_to_llama" and first.output_dir == out
    assert first.experiment_name == "example_chained_fusion"
    assert first.target.model_path == f"{roots['MODEL_ROOT']}/llama-3.1-8b-instruct"
    assert first.target.adapter_path == f"{ad}/llama_instruct/NER_mit-movie_sft"
    assert first.target.template == "llama3" and first.target.from_task == ""
    assert first.data.data_root == f"{roots['DATA_ROOT']}/uie_sample300"
    assert list(first.data.datasets) == UIE  # the main dataset first, then the replays
    assert [s.name for s in first.sources] == [
        "RE_New-York-Times-RE_sample_30000", "RE_conll04", "NER_TweetNER7_sample_15000",
        "ET_FabNER", "ET_FindVehicle"]
    assert first.sources[1].adapter_path == f"{ad}/Qwen2.5/UIE/RE_conll04"
    for path, value in SHARED_BLOCK.items():
        assert get(first, path) == value or path == "fusion.transfer_ratio", path
    assert first.fusion.transfer_ratio == "1"
    assert first.train.remat is True and first.mesh.fsdp == 1
    assert first.fusion.group_name == "heterofusion_transfer" and first.fusion.reuse_from == ""
    # Task 2 starts from task 1's export and continues its transfer networks.
    assert second.target.from_task == "qwen_to_llama"
    assert second.target.adapter_path == f"{out}/qwen_to_llama/merged_lora"
    assert second.fusion.reuse_from == "qwen_to_llama"
    assert [s.name for s in second.sources] == ["ET_Fab/sft", "ET_FindVehicle/sft"]
    assert hfjax_config.parse_transfer_ratio(second.fusion.transfer_ratio) == 0.5
    assert (second.train.epochs, second.train.lr, second.fusion.alpha_init) == (1, 2e-5, 0.1)
    assert second.train.remat is False  # extras are per task
    hfjax_config.validate_configs([first, second], check_paths=False)
    assert first.is_locked


def test_yaml_unset_variable_names_file_and_variable(tmp_path, roots, monkeypatch):
    monkeypatch.delenv("MODEL_ROOT")
    path = minimal_yaml(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "MODEL_ROOT" in str(e.value)
    assert "base_model_path" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("training, field, suggestion", [
    ("lamda_reg: 0.1", "tasks[0].training.lamda_reg", "lambda_reg"),
    ("num_epoch: 1", "tasks[0].training.num_epochs", None),
    ("train.lrr: 0.1", "tasks[0].training.train.lrr", "train.lr"),
    ("warmup: 0.1", "tasks[0].training.warmup", None),
])
def test_yaml_unknown_training_field(tmp_path, roots, training, field, suggestion):
    path = minimal_yaml(tmp_path, training)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    if suggestion:
        assert f"unknown field '{field}'" in message
        assert f"did you mean '{suggestion}'" in message
    else:
        assert "unknown field" in message and "did you mean" in message


def test_yaml_unknown_fields_elsewhere(tmp_path, roots):
    text = (MINIMAL_YAML % "lr: 1.0e-4").replace("base_model_path", "base_model_pth")
    path = write(tmp_path / "a.yaml", text)
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown field 'base_model_pth'; did you "
                                          r"mean 'base_model_path'"):
        load_config(path)
    text = (MINIMAL_YAML % "lr: 1.0e-4").replace("ratio: all", "ratoi: all")
    with pytest.raises(ConfigError, match=r"'tasks\[0\]\.datasets\[1\]\.ratoi'; did you mean "
                                          r"'ratio'"):
        load_config(write(tmp_path / "b.yaml", text))
    text = (MINIMAL_YAML % "lr: 1.0e-4").replace("template:", "templat:")
    with pytest.raises(ConfigError, match=r"'data_global\.templat'; did you mean 'template'"):
        load_config(write(tmp_path / "c.yaml", text))


@pytest.mark.parametrize("old, new, match", [
    ("lr: 1.0e-4", "output_dir: x", r"training\.output_dir': set it with output_dir"),
    ("lr: 1.0e-4", "batch_size: 2", r"'train\.batch_size' is set twice"),
    ("lr: 1.0e-4", "lr: 1.0e-4\n    grad_accum: 1.5",
     r"tasks\[0\]\.training\.grad_accum=1\.5: expected int"),
    ("lr: 1.0e-4", "mu_gate: 0.1", r"missing field 'tasks\[0\]\.training\.lr' \(the original"),
    ("  batch_size: 1\n", "", r"missing field 'data_global\.batch_size'"),
])
def test_yaml_refuses_what_it_cannot_honour(tmp_path, roots, old, new, match):
    text = MINIMAL_YAML % "lr: 1.0e-4"
    path = write(tmp_path / "run.yaml", text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("old, new, roles", [
    ("ratio: all", "ratio: all", ("main", "replay:all")),
    ("ratio: all", "ratio: 0.5", ("main", "replay:0.5")),  # was refused before roles existed
    (", ratio: all", "", ("main", "replay:0.1")),  # the original's default ratio
    ("type: replay, ratio: all", "ratio: 2", ("main", "replay:2")),  # type defaults to replay
])
def test_yaml_dataset_ratios_map_to_roles(tmp_path, roots, old, new, roles):
    text = (MINIMAL_YAML % "lr: 1.0e-4").replace(old, new, 1)
    (cfg,) = load_config(write(tmp_path / "run.yaml", text))
    assert tuple(cfg.data.datasets) == ("ds_main", "ds_replay") and tuple(cfg.data.roles) == roles
    validate_config(cfg, check_paths=False)


def test_yaml_replay_listed_first_still_follows_the_mains(tmp_path, roots):
    text = (MINIMAL_YAML % "lr: 1.0e-4").replace(
        "  - {name: ds_main, type: main}\n  - {name: ds_replay, type: replay, ratio: all}",
        "  - {name: ds_replay, type: replay, ratio: 0.25}\n  - {name: ds_main, type: main}")
    (cfg,) = load_config(write(tmp_path / "run.yaml", text))
    assert tuple(cfg.data.datasets) == ("ds_main", "ds_replay")
    assert tuple(cfg.data.roles) == ("main", "replay:0.25")


@pytest.mark.parametrize("old, new, match", [
    ("type: main", "type: replay, ratio: all",
     r"data\.roles=.*at least one dataset must be 'main'"),
    ("ratio: all", "ratio: 0", r"data\.roles\.1='replay:0': the replay ratio must be a number > 0"),
    ("ratio: all", "ratio: -1", r"data\.roles\.1='replay:-1': the replay ratio must be"),
    ("ratio: all", "ratio: most", r"data\.roles\.1='replay:most': replay ratio 'most' is not"),
    ("type: replay", "type: extra", r"data\.roles\.1='extra:all': must be main, replay:all"),
])
def test_yaml_dataset_rules_are_the_data_specs(tmp_path, roots, old, new, match):
    (cfg,) = load_config(write(tmp_path / "run.yaml", (MINIMAL_YAML % "lr: 1.0e-4").replace(
        old, new, 1)))
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(cfg, check_paths=False)
    assert "\n" not in e.value.problems[0]


def test_yaml_later_release_options_map_to_fusion_fields(tmp_path, roots):
    text = (MINIMAL_YAML % "lr: 1.0e-4\n    update_mode: ab_joint").replace(
        "datasets:", "layer_alignment: uniform\n  datasets:", 1)
    (cfg,) = load_config(write(tmp_path / "run.yaml", text))
    assert cfg.fusion.layer_alignment == "uniform" and cfg.fusion.update_mode == "ab_joint"
    bad = text.replace("ab_joint", "both").replace("uniform", "middle")
    (cfg,) = load_config(write(tmp_path / "bad.yaml", bad))
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, check_paths=False)
    assert any(p.startswith("fusion.layer_alignment='middle': must be") for p in e.value.problems)
    assert any(p.startswith("fusion.update_mode='both': must be") for p in e.value.problems)


def test_yaml_minimal_details(tmp_path, roots):
    text = (MINIMAL_YAML % "lr: 5e-5\n    seed: 7\n    train: {remat: true}").replace(
        "source_lora_paths:\n  - ${ADAPTER_ROOT}/qwen/a\n  - ${ADAPTER_ROOT}/qwen/b",
        "source_lora_path: ~/adapters/sft")
    (cfg,) = load_config(write(tmp_path / "run.yaml", text))
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)  # YAML reads 5e-5 as a str
    assert cfg.seed == 7 and cfg.train.remat is True
    assert cfg.sources[0].adapter_path == os.path.expanduser("~/adapters/sft")
    assert cfg.sources[0].name == "adapters/sft"  # "sft" alone says nothing
    assert list(cfg.data.datasets) == ["ds_main", "ds_replay"]
    assert cfg.train.batch_size == 1 and cfg.data.cutoff_len == 1024  # defaults


def test_yaml_with_overrides_and_escaped_dollar(tmp_path, roots, monkeypatch):
    monkeypatch.setenv("EXTRA", "xyz")
    path = minimal_yaml(tmp_path)
    (cfg,) = load_config(path, ["train.lr=3e-4", "task_name=${EXTRA}", "experiment_name=a$$b"])
    assert cfg.train.lr == 3e-4 and cfg.task_name == "xyz" and cfg.experiment_name == "a$b"
    assert hfjax_config.expand_env("${NOPE_NOT_SET:-dflt}/x") == "dflt/x"


def test_yaml_chain_three_tasks(tmp_path, roots):
    task = """\
    - task_name: {name}
      source_lora_path: /src/{name}
      datasets: [{{name: d, type: main}}]
      training: {{fusion_group_name: {group}, lr: 1.0e-4, num_epochs: 1}}
    """
    text = textwrap.dedent("""\
        output_dir: /out
        base_model_path: /m
        initial_target_lora: /t
        data_global: {template: qwen, batch_size: 1}
        tasks:
        """) + "".join(textwrap.dedent(task).format(name=n, group=g)
                       for n, g in (("a", "g1"), ("b", "g2"), ("c", "g1")))
    a, b, c = load_config(write(tmp_path / "chain.yaml", text))
    assert (a.target.adapter_path, b.target.adapter_path, c.target.adapter_path) == (
        "/t", "/out/a/merged_lora", "/out/b/merged_lora")
    assert (a.fusion.reuse_from, b.fusion.reuse_from, c.fusion.reuse_from) == ("", "", "a")
    assert a.data.data_root == "data"  # the original's default dataset_dir
    # Training keys left out take the original code's defaults, not the paper's.
    assert (a.fusion.mu_gate, a.rdm.lambda_reg, a.rdm.mu_target, a.rdm.num_projections,
            a.fusion.alpha_init, a.train.grad_accum) == (-0.5, 0.1, -1.0, 1024, 0.1, 8)
    assert a.fusion.block_size == 4096 and a.train.warmup_ratio == 0.05  # ours: fuse.py's


def test_yaml_chain_refuses_mismatched_reuse_and_duplicate_names(tmp_path, roots):
    text = textwrap.dedent("""\
        output_dir: /out
        base_model_path: /m
        initial_target_lora: /t
        data_global: {template: qwen, batch_size: 1}
        tasks:
        - {task_name: a, source_lora_path: /s, datasets: [{name: d, type: main}],
           training: {lr: 1.0e-4, num_epochs: 1}}
        - {task_name: b, source_lora_path: /s, datasets: [{name: d, type: main}],
           training: {embed_dim: 512, lr: 1.0e-4, num_epochs: 1}}
        """)
    with pytest.raises(ConfigError, match=r"fusion\.embed_dim=512 \(task 'b'\): reuses the "
                                          r"networks of task 'a'"):
        load_config(write(tmp_path / "x.yaml", text))
    with pytest.raises(ConfigError, match="share a name"):
        load_config(write(tmp_path / "y.yaml", text.replace("task_name: b", "task_name: a")
                          .replace("embed_dim: 512", "embed_dim: 1024")))


def test_py_config_chaining_and_arg(tmp_path):
    path = write(tmp_path / "two.py", """\
        from hfjax.configs import fuse

        def get_config(arg="x"):
            first, second = fuse.get_config(), fuse.get_config()
            first.task_name, first.output_dir = arg, "/out"
            second.task_name, second.output_dir = "second", "/out"
            second.target.from_task = arg
            second.fusion.reuse_from = arg
            return [first, second]
        """)
    first, second = load_config(f"{path}:alpha", ["train.epochs=1"])
    assert first.task_name == "alpha" and second.target.adapter_path == "/out/alpha/merged_lora"
    assert first.train.epochs == second.train.epochs == 1
    with pytest.raises(ConfigError, match=r"target\.from_task='nope'.*no earlier task"):
        load_config(f"{path}:alpha", ["target.from_task=nope"])


def test_py_config_sources_as_dicts(tmp_path):
    path = write(tmp_path / "dicts.py", """\
        from hfjax.configs import fuse

        def get_config():
            cfg = fuse.get_config()
            cfg.sources = [{"name": "a", "adapter_path": "/x/a"}, {"adapter_path": "/y/sft"}]
            return cfg
        """)
    (cfg,) = load_config(path)
    assert [(s.name, s.adapter_path) for s in cfg.sources] == [("a", "/x/a"), ("y/sft", "/y/sft")]


def test_py_config_unknown_field(tmp_path):
    path = write(tmp_path / "bad.py", """\
        from hfjax.configs import fuse

        def get_config():
            cfg = fuse.get_config()
            cfg.train.unlock()
            cfg.train.learning_rate = 1.0
            return cfg
        """)
    with pytest.raises(ConfigError, match=r"bad\.py: unknown field 'train\.learning_rate'"):
        load_config(path)


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_and_type_check():
    cfg = fuse.get_config()
    apply_overrides(cfg, [
        "train.lr=1e-4", "--config.train.epochs=2", "config.train.remat=true",
        "fusion.transfer_ratio=1/2", "data.datasets=a, b", "task_name=007",
        "mesh.rules=(('batch', 'data'), ('lora_r', None))", "rdm.lambda_reg=0",
    ])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2 and cfg.train.remat is True
    assert cfg.fusion.transfer_ratio == "1/2" and cfg.data.datasets == ("a", "b")
    assert cfg.task_name == "007" and cfg.mesh.rules == (("batch", "data"), ("lora_r", None))
    assert cfg.rdm.lambda_reg == 0.0 and isinstance(cfg.rdm.lambda_reg, float)
    apply_overrides(cfg, ["fusion.transfer_ratio=0.25"])
    assert hfjax_config.parse_transfer_ratio(cfg.fusion.transfer_ratio) == 0.25


def test_overrides_sources_forms():
    cfg = fuse.get_config()
    apply_overrides(cfg, ["sources=qwen_a=/x/a, mistral_b=/y/b"])
    assert [(s.name, s.adapter_path) for s in cfg.sources] == [("qwen_a", "/x/a"),
                                                               ("mistral_b", "/y/b")]
    apply_overrides(cfg, ["sources.1.adapter_path=/z/b"])
    assert cfg.sources[1].adapter_path == "/z/b"
    apply_overrides(cfg, ["sources=/q/one/sft,/q/two/sft"])
    assert [s.name for s in cfg.sources] == ["one/sft", "two/sft"]
    apply_overrides(cfg, ["sources=[{'name': 'n', 'adapter_path': '/p,q'}]"])
    assert cfg.sources[0].adapter_path == "/p,q"


@pytest.mark.parametrize("override, match", [
    ("train.lrr=1", r"unknown field 'train\.lrr'; did you mean 'train\.lr'"),
    ("fusion.mu_gat=1", r"did you mean 'fusion\.mu_gate'"),
    ("nothing", "expected FIELD=VALUE"),
    ("train.epochs=1.5", r"train\.epochs=1\.5: expected int, got float"),
    ("train.lr=abc", r"train\.lr='abc': expected float, got str"),
    ("train.lr=True", r"train\.lr=True: expected float, got bool"),
    ("train.remat=maybe", r"train\.remat='maybe': expected bool"),
    ("sources.5.name=x", r"unknown field 'sources\.5\.name'"),
])
def test_override_errors_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(fuse.get_config(), [override])


# --------------------------------------------------------------------------- validation


def _valid(tmp_path: Path) -> ml_collections.ConfigDict:
    """A config whose every path exists."""
    for name in ("target", "src_a", "src_b"):
        write(tmp_path / name / "adapter_config.json", "{}")
        write(tmp_path / name / "adapter_model.safetensors", "")
    write(tmp_path / "data" / "ds1.json", "[]")
    write(tmp_path / "data" / "dataset_info.json", json.dumps({"ds2": {}}))
    (tmp_path / "model").mkdir()
    cfg = fuse.get_config()
    apply_overrides(cfg, [
        f"target.model_path={tmp_path}/model", f"target.adapter_path={tmp_path}/target",
        f"sources=a={tmp_path}/src_a,b={tmp_path}/src_b", f"data.data_root={tmp_path}/data",
        "data.datasets=ds1,ds2", f"output_dir={tmp_path}/out",
    ])
    return cfg


def test_validate_accepts_existing_paths(tmp_path):
    validate_config(_valid(tmp_path))


def test_validate_reports_missing_paths(tmp_path):
    cfg = _valid(tmp_path)
    (tmp_path / "src_b" / "adapter_model.safetensors").unlink()
    apply_overrides(cfg, [f"target.model_path={tmp_path}/nope", "data.datasets=ds1,ds3"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    problems = e.value.problems
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert problems[0].startswith("target.model_path=") and "no such file" in problems[0]
    assert problems[1].startswith("sources.1.adapter_path=") and "no adapter_model" in problems[1]
    assert problems[2].startswith("data.datasets.1='ds3'")
    validate_config(cfg, check_paths=False)


def test_validate_skips_a_chained_target(tmp_path):
    cfg = _valid(tmp_path)
    apply_overrides(cfg, [f"target.adapter_path={tmp_path}/out/prev/merged_lora",
                          "target.from_task=prev"])
    validate_config(cfg)


@pytest.mark.parametrize("override, field", [
    ("target.template=chatml", "target.template='chatml'"),
    ("fusion.transfer_ratio=3/2", "fusion.transfer_ratio='3/2'"),
    ("fusion.transfer_ratio=half", "fusion.transfer_ratio='half'"),
    ("fusion.transfer_ratio=0", "fusion.transfer_ratio=0"),
    ("fusion.block_size=0", "fusion.block_size=0"),
    ("fusion.num_heads=3", "fusion.num_heads=3"),
    ("fusion.gate=closed", "fusion.gate='closed'"),
    ("fusion.layer_alignment=middle", "fusion.layer_alignment='middle': must be one of tail, "
                                      "head, naive, uniform"),
    ("fusion.update_mode=both", "fusion.update_mode='both': must be one of b_only, a_only, "
                                "ab_joint"),
    ("rdm.activation=gelu", "rdm.activation='gelu'"),
    ("rdm.sort=bitonic", "rdm.sort='bitonic'"),
    ("rdm.sigma_target=0", "rdm.sigma_target=0.0"),
    ("train.lr=-1", "train.lr=-1.0"),
    ("train.grad_accum=0", "train.grad_accum=0"),
    ("train.max_steps=0", "train.max_steps=0"),
    ("train.b2=1", "train.b2=1.0"),
    ("train.base_dtype=int8", "train.base_dtype='int8'"),
    ("data.min_bucket=2048", "data.min_bucket=2048"),
    ("mesh.fsdp=-1", "mesh="),
    ("mesh.rules=(('lora_r', 'tensor'),)", "mesh.rules.0="),
    ("task_name=a/b", "task_name='a/b'"),
    ("sources=a=/x,a=/y", "sources.1.name='a'"),
    ("data.datasets=ds1,ds1", "data.datasets.1='ds1'"),
])
def test_validate_names_field_and_value(tmp_path, override, field):
    cfg = _valid(tmp_path)
    apply_overrides(cfg, [override])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, check_paths=False)
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(field), e.value.problems


def test_option_choices_match_the_fusion_layer():
    from hfjax.config import components
    from hfjax.fusion import plan

    assert components.LAYER_ALIGNMENTS is plan.LAYER_ALIGNMENTS  # one table, re-exported
    assert components.UPDATE_MODES is plan.UPDATE_MODES


@pytest.mark.parametrize("override", ["fusion.layer_alignment=uniform",
                                      "fusion.update_mode=ab_joint"])
def test_later_release_options_validate(tmp_path, override):
    cfg = _valid(tmp_path)
    apply_overrides(cfg, [override])
    validate_config(cfg, check_paths=False)


def test_template_resolution_and_export_dir(tmp_path):
    assert hfjax_config.resolve_template("auto", "qwen2") == "qwen"
    assert hfjax_config.resolve_template("mistral", "llama") == "mistral"
    with pytest.raises(ConfigError, match="gemma"):
        hfjax_config.resolve_template("auto", "gemma")
    cfg = _valid(tmp_path)
    assert hfjax_config.export_dir(cfg) == f"{tmp_path}/out/heterofusion/merged_lora"
    assert not hfjax_config.is_finished(cfg)
    write(Path(hfjax_config.export_dir(cfg)) / "adapter_model.safetensors", "")
    assert not hfjax_config.is_finished(cfg)  # an export alone may be a killed run's
    write(Path(hfjax_config.export_dir(cfg)).parent / "COMPLETE.json", "{}")
    assert hfjax_config.is_finished(cfg)
    dumped = json.loads(json.dumps(hfjax_config.config_to_dict(cfg)))
    assert dumped["sources"][1] == {"name": "b", "adapter_path": f"{tmp_path}/src_b"}


# --------------------------------------------------------------------------- run_sweep

FAKE_FUSE = """\
    import json, os, sys
    from hfjax.configs import paper  # light: hfjax imports JAX lazily, and this must be quick
    args = sys.argv[1:]
    spec = args[args.index("--config") + 1]
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if os.environ.get("FAKE_FAIL") and spec.endswith(os.environ["FAKE_FAIL"]):
        print("fake failure"); sys.exit(3)
    if "--dry_run" not in args and "paper.py:" in spec:
        cfg = paper.get_config(spec.split("paper.py:")[1])
        out = os.path.join(cfg.output_dir, cfg.task_name, "merged_lora")
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "adapter_model.safetensors"), "w").close()
"""
SWEEP = ["sensitivity_alpha/0.05", "sensitivity_alpha/0.1", "sensitivity_alpha/0.15"]


def run_sweep(tmp_path, *args, env=None):
    fake = write(tmp_path / "fake_fuse.py", FAKE_FUSE)
    log = tmp_path / "calls.jsonl"
    full_env = {**os.environ, "FAKE_LOG": str(log), **(env or {})}
    for var in ("DRY_RUN", "SKIP_FINISHED", "FAKE_FAIL"):
        full_env.setdefault(var, "")
    proc = subprocess.run(
        [sys.executable, str(RUN_SWEEP), "--cmd", f"{sys.executable} {fake}",
         "--log_dir", str(tmp_path / "logs"), *args],
        capture_output=True, text=True, env=full_env, cwd=tmp_path)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, [c[c.index("--config") + 1].split(":")[-1] for c in calls], calls


def test_sweep_runs_all_and_passes_overrides(tmp_path, roots):
    proc, specs, calls = run_sweep(tmp_path, *SWEEP, "-o", "train.max_steps=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert specs == SWEEP and all("--config.train.max_steps=2" in c for c in calls)
    assert all("--dry_run" not in c for c in calls)
    assert "ok: 3" in proc.stdout
    assert (Path(roots["OUTPUT_ROOT"]) / "paper/sensitivity_alpha/0.1/alpha_sweep/merged_lora"
            / "adapter_model.safetensors").exists()


def test_sweep_dry_run(tmp_path, roots):
    proc, specs, calls = run_sweep(tmp_path, "sensitivity_alpha/0.1*", env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert specs == ["sensitivity_alpha/0.1", "sensitivity_alpha/0.15"]
    assert all(c[-1] == "--dry_run" for c in calls)
    assert "dry-run" in proc.stdout and not Path(roots["OUTPUT_ROOT"]).exists()


def test_sweep_skip_finished(tmp_path, roots):
    done = Path(roots["OUTPUT_ROOT"]) / "paper/sensitivity_alpha/0.1/alpha_sweep/merged_lora"
    write(done / "adapter_model.safetensors", "")
    write(done.parent / "COMPLETE.json", "{}")  # "finished" is the marker, written last
    proc, specs, _ = run_sweep(tmp_path, *SWEEP, env={"SKIP_FINISHED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert specs == ["sensitivity_alpha/0.05", "sensitivity_alpha/0.15"]
    assert "skipped" in proc.stdout
    proc, specs, _ = run_sweep(tmp_path, *SWEEP)  # without SKIP_FINISHED: everything runs
    assert len(specs) == 5  # 2 from before + 3


def test_sweep_stops_at_the_first_error(tmp_path, roots):
    proc, specs, _ = run_sweep(tmp_path, *SWEEP, env={"FAKE_FAIL": "0.1"})
    assert proc.returncode == 1
    assert specs == ["sensitivity_alpha/0.05", "sensitivity_alpha/0.1"]
    assert "fake failure" in proc.stdout  # the failed run's log tail
    assert "not run" in proc.stdout and "failed: 1" in proc.stdout


def test_sweep_keep_going(tmp_path, roots):
    proc, specs, _ = run_sweep(tmp_path, *SWEEP, "--keep_going", env={"FAKE_FAIL": "0.1"})
    assert proc.returncode == 1
    assert specs == SWEEP and "ok: 2" in proc.stdout and "failed: 1" in proc.stdout


def test_sweep_config_files_and_plan(tmp_path, roots):
    yaml_path = minimal_yaml(tmp_path)
    paper_spec = f"{REPO}/configs/paper.py:noise_robustness"
    proc, specs, _ = run_sweep(tmp_path, str(yaml_path), paper_spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert specs == [str(yaml_path), "noise_robustness"]
    proc = subprocess.run(["bash", str(REPO / "scripts/run_paper.sh"), "--plan", "ablation/*"],
                          capture_output=True, text=True, env={**os.environ,
                                                               "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("-m hfjax.cli fuse --config") == 3
    proc, _, _ = run_sweep(tmp_path, "no_such_experiment")
    assert proc.returncode != 0 and "neither a config file nor a paper experiment" in proc.stderr
