"""The later release's dataset roles through the fuse job: ``data.roles`` -> `prepare` ->
``--dry_run`` (docs/algorithm.md §8, §11)."""

from __future__ import annotations

import pytest

from hfjax.config import apply_overrides
from hfjax.config.problems import ConfigError
from hfjax.testing.zoo import build_zoo, tiny_fuse_config
from hfjax.training.fuse_loop import prepare, run_fusion


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"))  # two replay files of 24 records


def test_replay_ratio_samples_from_the_main_count(zoo, tmp_path):
    cfg = tiny_fuse_config(zoo, tmp_path)
    apply_overrides(cfg, ["data.roles=main,replay:0.5", "seed=5"])
    replay = prepare(cfg).replay
    # int(0.5 * 24 main records) = 12 of relation_replay's 24.
    assert replay.usage == {"movie_replay": ("main", 24, 24),
                            "relation_replay": ("replay:0.5", 24, 12)}
    assert len(replay) == 36
    ids = [ex.input_ids.tolist() for ex in replay.examples[24:]]
    assert ids == [ex.input_ids.tolist() for ex in prepare(cfg).replay.examples[24:]]
    cfg.seed = 6
    assert ids != [ex.input_ids.tolist() for ex in prepare(cfg).replay.examples[24:]]


def test_plain_datasets_keep_every_record_in_order(zoo, tmp_path):
    replay = prepare(tiny_fuse_config(zoo, tmp_path)).replay
    assert [ex.source for ex in replay.examples] == ["movie_replay"] * 24 + ["relation_replay"] * 24
    assert replay.usage["relation_replay"] == ("pooled", 24, 24)


def test_dry_run_shows_role_available_and_used(zoo, tmp_path, capsys):
    cfg = tiny_fuse_config(zoo, tmp_path)
    cfg.data.datasets = ("relation_replay", "movie_replay")
    cfg.data.roles = ("replay:0.25", "main")
    run_fusion(cfg, dry_run=True, progress=False)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("dataset "))
    assert header.split()[:4] == ["dataset", "role", "avail", "used"]
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()
            if line.split() and line.split()[0] in ("movie_replay", "relation_replay")}
    assert rows == {"movie_replay": ["main", "24", "24"],
                    "relation_replay": ["replay:0.25", "24", "6"]}


def test_roles_without_a_main_are_refused_before_loading(zoo, tmp_path):
    cfg = tiny_fuse_config(zoo, tmp_path)
    cfg.data.roles = ("replay:all", "replay:0.5")
    with pytest.raises(ConfigError, match=r"data\.roles=.*at least one dataset must be 'main'"):
        prepare(cfg)
