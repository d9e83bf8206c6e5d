"""A first run on a fresh clone: the embedded default's shards are written on first use (the same bytes as
`make data`), once even when several processes start together; any other missing data fails naming its path."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest
from conftest import ROOT

from distill.data import DataError
from distill.data.synthetic import DEFAULT_SHARDS, ensure_default_shards, write_split
from distill.data.wds import as_data_config, make_plan

# One process goes through the loader's own entry (make_plan), one calls the helper directly; either may win.
RACER = """
import sys
from distill.data.synthetic import ensure_default_shards
from distill.data.wds import as_data_config, make_plan
if sys.argv[2] == "plan":
    plan = make_plan(as_data_config({"shards": sys.argv[1]}), world_size=2, seed=0)
    assert sum(plan.counts) == 20000, plan.counts
else:
    ensure_default_shards(sys.argv[1])
"""


def test_default_shards_are_written_once_by_concurrent_processes(tmp_path):
    pattern = str(tmp_path / "data" / DEFAULT_SHARDS)
    yaml_default = (ROOT / "configs" / "data" / "tiny_world.yaml").read_text()
    assert "${oc.env:DISTILL_DATA,data}/" + DEFAULT_SHARDS in yaml_default  # the pattern the helper recognises
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, pattern, how], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for how in ("plan", "direct")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sum("writing them to" in o[0] for o in outs) == 1  # one wrote, the other waited on the lock
    root = tmp_path / "data" / "tiny_world"
    assert (root / ".done").exists() and (root / "info.json").exists()
    assert len(list((root / "heldout").glob("*.tar"))) == 2
    # the same bytes as `make data` (python -m distill.data.synthetic --out DIR: seed 0, 1000 samples a shard)
    write_split(tmp_path / "ref", "train", 1000, seed=0, samples_per_shard=1000)
    assert (root / "train" / "00000.tar").read_bytes() == (tmp_path / "ref" / "00000.tar").read_bytes()
    assert not ensure_default_shards(pattern)  # complete: nothing more to do


def test_other_shards_are_never_generated(tmp_path):
    assert not ensure_default_shards(str(tmp_path / "mine" / "{00000..00019}.tar"))
    assert not ensure_default_shards([str(tmp_path / DEFAULT_SHARDS)])  # lists are the user's own data
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataError, match="none holds a sample"):
        make_plan(as_data_config({"shards": str(tmp_path / "mine" / "{00000..00001}.tar")}), world_size=1, seed=0)


def test_missing_tiny_world_subset_names_the_command(tmp_path):
    """A tiny-world path that is not the default pattern (a subset, as tests and bench/soak use) is not generated:
    the error says which command writes it."""
    pattern = str(tmp_path / "tiny_world" / "train" / "{00000..00003}.tar")
    with pytest.raises(DataError, match=r"make data"):
        make_plan(as_data_config({"shards": pattern}), world_size=1, seed=0)


def test_existing_shards_are_kept(tmp_path):
    """The tests' own small world (8 samples a shard) is complete: first use leaves it as it is."""
    paths = write_split(tmp_path / "tiny_world" / "train", "train", n=160, seed=0, samples_per_shard=8)
    assert not ensure_default_shards(str(tmp_path / DEFAULT_SHARDS))
    with tarfile.open(paths[0]) as tar:
        assert len(tar.getnames()) == 3 * 8


def test_the_prompt_list_is_written_from_existing_shards(tmp_path):
    """data=tiny_world_prompts on shards an older `make data` wrote: only the prompt list is added, line i the
    caption of sample i."""
    from distill.data.synthetic import DEFAULT_PROMPTS

    paths = write_split(tmp_path / "tiny_world" / "train", "train", n=160, seed=0, samples_per_shard=8)
    before = [p.stat().st_mtime_ns for p in paths]
    assert ensure_default_shards(str(tmp_path / DEFAULT_PROMPTS))
    lines = (tmp_path / DEFAULT_PROMPTS).read_text().splitlines()
    with tarfile.open(paths[1]) as tar:
        first = tar.extractfile("000000008.txt").read().decode()
    assert len(lines) == 160 and lines[8] == first
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert not ensure_default_shards(str(tmp_path / DEFAULT_PROMPTS))
