"""The trainer/method contract on a mock method (refiners' MockTrainer): two optimizers at a 5:1 cadence with their
own cosine schedules, resumed mid-way equal to the uninterrupted run; metrics averaged over micro-batches and
repeated phases; gradient isolation through `phase_scope`; a NaN on one rank skips the step on every rank (a
2-process CPU run of this very file, see `_main` at the bottom)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from distill.callbacks import Callback
from distill.methods import register
from distill.methods.base import Method
from distill.methods.gan import frozen
from distill.optim import OptimizerSpec

SELF = str(Path(__file__).resolve())


@dataclass
class MockConfig:
    name: str = "mock"
    every: int = 5  # optimizer "b" steps every 5th step, "a" every step
    repeat_a: int = 1  # phase "a" runs this many times per step
    nan_at: int = -1  # (0-based) step whose phase-"a" loss VALUE is NaN on rank `nan_rank` (finite gradients)
    nan_rank: int = 0
    crash_at: int = -1  # (0-based) step at which the process "dies" (KeyboardInterrupt), after a checkpoint


class _RankSums(Callback):
    def on_fit_end(self, trainer) -> None:  # what each rank holds at the end
        sums = {n: float(sum(p.detach().double().sum() for p in m.parameters())) for n, m in trainer.method.raw.items()}
        (trainer.run_dir / f"rank{trainer.acc.process_index}.json").write_text(json.dumps(sums))


class MockMethod(Method):
    """A ~40-line method: two linear nets, each trained by its own optimizer; each phase reads the other net."""

    Config = MockConfig

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        torch.manual_seed(0)
        self.raw = {"a": nn.Linear(4, 1).to(device), "b": nn.Linear(4, 1).to(device)}
        self.modules = dict(self.raw)
        self.seen: list[tuple[int, str, float]] = []

    def optimizers(self):
        m = self.cfg.method
        return [OptimizerSpec("a", list(self.raw["a"].parameters()), {"scheduler": "cosine", "lr": 0.1}, primary=True),
                OptimizerSpec("b", list(self.raw["b"].parameters()), {"scheduler": "cosine", "lr": 0.05, "name": "sgd"},
                              every_n_steps=m.every)]

    def phases(self, step):
        return ("a",) * self.cfg.method.repeat_a + (("b",) if step % self.cfg.method.every == 0 else ())

    def phase_scope(self, phase):
        return frozen(self.raw["b" if phase == "a" else "a"])

    def losses(self, batch, phase, step):
        if step == self.cfg.method.crash_at:
            raise KeyboardInterrupt("killed")
        x = batch.latents.flatten(1)[:, :4]
        other = self.raw["b" if phase == "a" else "a"]
        loss = (self.modules[phase](x) + 0.5 * other(x) - 1.0).pow(2).mean()
        self.seen.append((step, phase, float(loss)))
        m = self.cfg.method
        if step == m.nan_at and phase == "a" and int(getattr(self, "rank", 0)) == m.nan_rank:
            loss = loss + torch.tensor(float("nan"))  # the value only: the gradient stays finite
        return {"loss": loss, "twice": 2 * loss.detach()}

    def callbacks(self):
        return [_RankSums()]

    def set_prepared(self, modules):
        super().set_prepared(modules)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


register("mock", f"{__name__}:MockMethod")


def mock_cfg(out: Path, **method) -> dict:
    from helpers import compose_cfg

    cfg = OmegaConf.to_container(compose_cfg(["+experiment=lcm_lora_tiny", "+debug=fast", "trainer.validation_prompts=[]",
                                              "trainer.export_at_end=false", "data.batch_size=2"]))
    cfg["method"] = {"name": "mock", **method}
    cfg["output_dir"] = str(out)
    cfg["trainer"].update(max_steps=12, checkpoint_every_steps=6, log_every_steps=1)
    return cfg


def _run(cfg: dict):
    import distill

    return distill.run(OmegaConf.create(cfg))


def test_cadence_and_own_schedules_resume_like_the_uninterrupted_run(tiny_data, tmp_path):
    full = _run(mock_cfg(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):  # dies in step 7, after checkpoint step_6 (b stepped at 0 and 5)
        _run(mock_cfg(tmp_path / "resumed", crash_at=6))
    assert json.loads((tmp_path / "resumed/checkpoints/step_6/trainer_state.json").read_text())["schedules"]["b"][
        "last_epoch"] == 2
    again = mock_cfg(tmp_path / "resumed")
    again["resume"] = "latest"
    resumed = _run(again)
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(str(full / "checkpoints/step_12" / name))
        b = load_file(str(resumed / "checkpoints/step_12" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=f"{name}:{k}")
    sa = json.loads((full / "checkpoints/step_12/trainer_state.json").read_text())["schedules"]
    sb = json.loads((resumed / "checkpoints/step_12/trainer_state.json").read_text())["schedules"]
    assert sa["a"]["last_epoch"] == 12 and sa["b"]["last_epoch"] == 3  # b stepped at 0, 5, 10: its own count
    assert sa["a"]["last_epoch"] == sb["a"]["last_epoch"] and sa["b"]["last_epoch"] == sb["b"]["last_epoch"]
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    # each cosine runs over its own steps: b's lr after its 1st of 3 steps is 0.05 * (1 + cos(pi / 3)) / 2
    assert rows[0]["train/lr_b"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert rows[-1]["train/lr_a"] == pytest.approx(0.0, abs=1e-12) and "train/lr_b" not in rows[1]
    assert "train/loss" in rows[0] and "train/b_loss" in rows[0]


def test_metrics_average_micro_batches_and_repeats_and_isolate_gradients(tiny_data, tmp_path):
    from distill.runner import make_accelerator
    from distill.trainer import Trainer
    from distill.config import validate

    cfg = mock_cfg(tmp_path, repeat_a=2)
    cfg["trainer"]["gradient_accumulation_steps"] = 2
    cfg = validate(OmegaConf.create(cfg))
    acc = make_accelerator(cfg)
    tr = Trainer(cfg, acc, tmp_path, callbacks=[])
    try:
        m = tr.method
        batches = [tr.to_batch(b) for b, _ in zip(iter(tr.loader), range(2))]
        tr.step = 1  # "a" only (twice), "b" not due
        b0 = {k: v.clone() for k, v in m.raw["b"].state_dict().items()}
        logs = tr.train_step(batches)
        a_losses = [v for s, p, v in m.seen if p == "a"]
        assert len(a_losses) == 4  # 2 repeats x 2 micro-batches, averaged, not the last one kept
        assert float(logs["train/loss"]) == pytest.approx(sum(a_losses) / 4, rel=1e-6)
        assert float(logs["train/twice"]) == pytest.approx(2 * sum(a_losses) / 4, rel=1e-6)
        assert all(torch.equal(b0[k], v) for k, v in m.raw["b"].state_dict().items()), "phase a changed b"
        assert all(p.grad is None for p in m.raw["b"].parameters()) and all(p.requires_grad for p in m.raw["b"].parameters())
    finally:
        tr.close()
        acc.free_memory()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tiny_data, tmp_path):
    from conftest import run_cli
    from test_distributed import ACCELERATE, free_port

    out = tmp_path / "ddp"
    run_cli([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
             str(free_port()), SELF, str(out), "3", "1"], env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
            timeout=900)
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0 == r1, f"the ranks disagree after a NaN on rank 1 alone: {r0} vs {r1}"
    state = json.loads((out / "checkpoints/step_12/trainer_state.json").read_text())
    assert state["counters"]["nonfinite_steps"] == 1
    assert state["schedules"]["a"]["last_epoch"] == 11  # the NaN step was not taken


def _main(argv: list[str]) -> None:
    """`accelerate launch tests/test_trainer_contract.py OUT NAN_AT NAN_RANK`: the mock run on every rank."""
    sys.path.insert(0, str(Path(SELF).parent))
    register("mock", "__main__:MockMethod")
    out, nan_at, nan_rank = Path(argv[0]), int(argv[1]), int(argv[2])
    _run(mock_cfg(out, nan_at=nan_at, nan_rank=nan_rank))


if __name__ == "__main__":
    _main(sys.argv[1:])
