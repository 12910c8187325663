"""The config boundary: ConfigDicts become frozen typed jobs, each rule checked in one place."""

from __future__ import annotations

import dataclasses

import pytest
from hfjax.configs import fuse
from hfjax.configs import train_lora as lora_schema

from hfjax.config import (
    ConfigError,
    FuseJob,
    LoraJob,
    PlanConfig,
    TransferNetConfig,
    apply_overrides,
    as_fuse_job,
    parse_transfer_ratio,
    resolve_template,
    to_fuse_job,
    to_lora_job,
)
from hfjax.config.jobs import fuse_job_from, lora_job_from
from hfjax.models.families import FAMILIES


def _cfg(**fields):
    cfg = fuse.get_config()
    apply_overrides(cfg, ["target.model_path=/m", "target.adapter_path=/t",
                          "sources=q=/s/qwen", "data.data_root=/d", "data.datasets=a,b",
                          *[f"{k}={v}" for k, v in fields.items()]])
    return cfg


def test_fuse_job_is_frozen_typed_and_hashable():
    job = to_fuse_job(_cfg(**{"fusion.transfer_ratio": "1/2", "train.lr": "1e-4"}),
                      check_paths=False)
    assert isinstance(job, FuseJob) and job.plan.ratio == 0.5
    assert job.plan.transfer_ratio == "1/2"  # as written, for messages and reports
    assert (job.net.embed_dim, job.optim.lr, job.train.grad_accum) == (1024, 1e-4, 8)
    assert job.sources[0].name == "q" and job.mesh.rules[0] == ("batch", ("data", "fsdp"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.net.embed_dim = 8  # type: ignore[misc]
    hash((job.plan, job.net, job.rdm, job.optim, job.train, job.mesh))
    assert job.to_dict()["net"]["num_heads"] == 8


def test_statics_equal_across_alpha_init_but_not_gate():
    from hfjax.training.fuse_step import FuseStatics

    def statics(**fields):
        job = to_fuse_job(_cfg(**fields), check_paths=False)
        return FuseStatics(plan=None, model=None, net=job.net, rdm=job.rdm, optim=job.optim,
                           steps=10)

    base = statics()
    assert statics(**{"fusion.alpha_init": 0.9}) == base  # init only: one compilation
    assert hash(statics(**{"fusion.alpha_init": 0.9})) == hash(base)
    assert statics(**{"fusion.gate": "open"}) != base
    assert base.net_kwargs["embed_dim"] == 1024 and base.rdm_kwargs["num_projections"] == 2048


def test_unnamed_sources_get_the_one_naming_rule():
    cfg = _cfg()
    cfg.sources = ({"adapter_path": "/x/ET_Fab/sft"}, {"adapter_path": "/y/RE_conll04"})
    job = to_fuse_job(cfg, check_paths=False)
    assert [s.name for s in job.sources] == ["ET_Fab/sft", "RE_conll04"]
    from hfjax.config.sources import source_entries

    assert source_entries("/p/one/sft,n=/p/two/sft") == [("one/sft", "/p/one/sft"),
                                                         ("n", "/p/two/sft")]
    cfg.sources = ({"path": "/x"},)
    with pytest.raises(ConfigError, match=r"^sources\.0="):
        to_fuse_job(cfg, check_paths=False)


def test_transfer_ratio_bool_refused_by_config_and_plan():
    cfg = _cfg()
    cfg.fusion.transfer_ratio = True
    with pytest.raises(ConfigError) as e:
        to_fuse_job(cfg, check_paths=False)
    assert e.value.problems == ["fusion.transfer_ratio=True: expected a number or 'a/b'"]
    from hfjax.fusion import FusionError, build_plan
    from hfjax.testing.adapters import random_adapter

    t, s = random_adapter(4, 8, 12, 2, seed=0), random_adapter(4, 8, 12, 2, seed=1)
    with pytest.raises(FusionError, match="transfer_ratio=True"):
        build_plan(t, [s], block_size=4, transfer_ratio=True)
    with pytest.raises(FusionError, match="transfer_ratio=True"):
        build_plan(t, [s], PlanConfig(block_size=4, transfer_ratio=True))
    assert build_plan(t, [s], PlanConfig(block_size=4, transfer_ratio="1/2")).transfer_ratio \
        == 0.5
    with pytest.raises(ConfigError, match="transfer_ratio"):
        parse_transfer_ratio(False)


def test_heads_rule_is_one_rule_for_config_and_network():
    problems = TransferNetConfig(embed_dim=32, num_heads=3).check()
    assert problems == ["fusion.num_heads=3: must divide fusion.embed_dim=32 (32 is not "
                        "divisible by 3)"]
    import jax
    import jax.numpy as jnp

    from hfjax.fusion import FusionError, TransferNet

    net = TransferNet(4, 2, embed_dim=32, num_heads=3, max_pos=8)
    with pytest.raises(FusionError, match=r"^num_heads=3: must divide embed_dim=32"):
        net.init(jax.random.key(0), jnp.zeros((1, 2, 8)), jnp.ones((1, 2, 2)),
                 jnp.zeros((1, 2, 8)), jnp.ones((1, 2, 2)), n_a=1)


def test_run_fusion_checks_its_config_on_entry(tmp_path):
    from hfjax.training.fuse_loop import run_fusion

    cfg = fuse.get_config()
    cfg.output_dir = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        run_fusion(cfg, progress=False)
    assert {p.split("=")[0] for p in e.value.problems} == {
        "target.model_path", "target.adapter_path", "sources", "data.data_root",
        "data.datasets"}
    job, _ = fuse_job_from(_cfg())  # a job is checked again: its paths do not exist
    with pytest.raises(ConfigError, match="no such file or directory"):
        as_fuse_job(job)
    assert not any(tmp_path.iterdir())


def test_lora_job_and_train_lora_check_on_entry(tmp_path):
    from hfjax.training.lora_train import train_lora

    cfg = lora_schema.get_config()
    with pytest.raises(ConfigError, match=r"^model_path='': must be set"):
        to_lora_job(cfg)
    job = lora_job_from(cfg)
    assert isinstance(job, LoraJob) and job.optim.b1 == 0.9 and job.optim.lr == 1e-4
    assert job.lora.target_modules == lora_schema.ALL_LINEAR
    with pytest.raises(ConfigError, match="model_path"):
        train_lora(job, progress=False)
    job = dataclasses.replace(job, model_path=str(tmp_path), task_name="a/b")
    problems = job.problems(check_paths=False)
    assert [p.split("=")[0] for p in problems] == ["task_name", "data_root", "datasets"]


def test_templates_come_from_the_family_table():
    for model_type, fam in FAMILIES.items():
        assert resolve_template("auto", model_type) == fam.template
    with pytest.raises(ConfigError, match=r"^template='auto'.*'gemma'"):
        resolve_template("auto", "gemma", field="template")
