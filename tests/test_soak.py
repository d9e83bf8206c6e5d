"""bench/soak.py itself, at a tiny size: kills at random points and mid-checkpoint, every checkpoint valid, the final
weights equal to the uninterrupted run's. (The 2,000-step figures are in bench/RESULTS.md.)"""

import json
import sys

import pytest
from conftest import ROOT, run_cli


@pytest.mark.slow
def test_soak_script_survives_kills_and_matches_uninterrupted(tiny_data, tmp_path):
    out = tmp_path / "soak"
    proc = run_cli([sys.executable, str(ROOT / "bench/soak.py"), "--steps", "30", "--every", "5", "--kills", "3",
                    "--min-alive", "6", "--max-alive", "9", "--batch-size", "2", "--out", str(out),
                    "--shards", str(tiny_data / "tiny_world/train/{00000..00003}.tar"), "+debug=fast"], timeout=900)
    record = json.loads((out / "soak.json").read_text())
    assert record["failures"] == [], proc.stdout[-3000:]
    assert record["final_equal"] is True
    assert record["killed"]["kills"], "at least one kill landed before the run ended"
    assert record["rss_mb"]["max"] > 100, "memory was sampled from the live process"
