"""Generic staging: a run made of stages (PAD's 128 -> 32 -> 8 -> 4 -> 2 -> 1 chain, the progressive consistency
methods to come). A method's `plan` returns `Stage`s; this module runs them one Trainer each, in
`stages/<i>_<name>/` with its own checkpoints and export, skips finished ones on resume, keeps intermediate exports
in fp32, maps a checkpoint path to its stage, hands the data position and seed sequence on (`carry.json`), writes
what the stage was derived from (`stage.json`) and copies the last export to the run's `export/`."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

CARRY = "carry.json"  # a finished stage's data position and seed sequence, read by the next stage
STAGE = "stage.json"  # what a stage starts from (the method's stage-derived values), for export and inspection


@dataclass
class Stage:
    """One stage of a run. `info`: the method's stage-derived values (what the student, teacher or LoRA start
    from; prediction types), never user config keys. `trainer`: trainer.* settings of this stage (max_steps: the
    stage's own count, capped by trainer.max_stage_steps when set; a stage without one runs trainer.max_steps).
    `data`: data.* settings of this stage (a warm-up on other data: DMD2's regression on teacher ODE pairs); a stage
    whose data differs from the previous one's starts its own stream.
    `optim`: optim.* settings of this stage. `method`: method.* settings of this stage; with a `name` of another
    method, the stage runs THAT method (a chain of methods on one loop: Hyper-SD's segmented consistency, reward
    fine-tuning and score distillation), its config this dict on that method's schema, checked like a run's."""

    name: str
    index: int
    folder: Path
    info: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d

    @classmethod
    def read(cls, folder: Path) -> Stage | None:
        path = Path(folder) / STAGE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        return cls(d["name"], d["index"], Path(d["folder"]), d.get("info", {}), d.get("trainer", {}),
                   d.get("data", {}), d.get("optim", {}), d.get("method", {}))


def stage_folder(run_dir: Path, index: int, name: str) -> Path:
    """The one rule for a stage's folder."""
    return Path(run_dir) / "stages" / f"{index:02d}_{name}"


def stage_config(cfg: DictConfig, stage: Stage, staged: bool, last: bool) -> DictConfig:
    """The run's config with the stage's trainer settings; a stage of a chain always exports (the next stage starts
    from it, and it marks the stage done), in fp32 unless it is the last (small late updates would round away)."""
    c = copy.deepcopy(cfg)
    for key, value in stage.trainer.items():
        c.trainer[key] = value
    cap = cfg.trainer.max_stage_steps
    if cap is not None and c.trainer.max_steps > cap:  # said, never silent: a debug preset's cap
        log.warning("stage %r: %d steps capped to trainer.max_stage_steps=%d", stage.name, c.trainer.max_steps, cap)
        c.trainer.max_steps = cap
    for key, value in stage.data.items():
        c.data[key] = value
    for key, value in stage.optim.items():
        c.optim[key] = value
    if stage.method:
        c.method = stage_method_config(c, stage)
    if staged:
        c.trainer.export_at_end = True
        if not last:
            c.trainer.export_dtype = "fp32"
        if cfg.resume and cfg.resume != "latest":  # a checkpoint path belongs to one stage only
            inside = Path(cfg.resume).resolve().is_relative_to(stage.folder.resolve())
            c.resume = cfg.resume if inside else "latest"
    return c


def stage_method_config(cfg: DictConfig, stage: Stage) -> DictConfig:
    """The method config a stage runs: the run's method.* with the stage's settings, or (the stage names another
    method) the stage's dict on that method's schema, checked by that method (ConfigError names the stage)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from distill.config import ConfigError
    from distill.methods import METHOD_CLASSES, known_methods

    name = stage.method.get("name", cfg.method.name)
    if name not in known_methods():
        raise ConfigError(f"stage {stage.name!r}: method.name={name!r} is unknown; known: {known_methods()}")
    cls = METHOD_CLASSES[name]
    base = cfg.method if name == cfg.method.name else OmegaConf.structured(cls.Config)
    try:
        method = OmegaConf.merge(base, OmegaConf.create({**stage.method, "name": name}))
    except OmegaConfBaseException as e:
        raise ConfigError(f"stage {stage.name!r} ({name}): invalid method key "
                          f"'{getattr(e, 'full_key', '')}': {getattr(e, 'msg', e)}") from None
    if name != cfg.method.name:
        probe = copy.deepcopy(cfg)
        OmegaConf.set_struct(probe, False)
        probe.method = method
        try:
            cls.check(probe)
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name!r} ({name}): {e}") from None
    return method


def run_stages(cfg: DictConfig, acc, run_dir: Path) -> None:
    """Plan the method's stages and run them in order (one Trainer each)."""
    from accelerate.utils import set_seed

    from distill.methods import METHOD_CLASSES
    from distill.trainer import Trainer

    stages = METHOD_CLASSES[cfg.method.name].plan(cfg, run_dir)
    staged, carry = len(stages) > 1, None
    reused = reuse_stages(cfg, stages, run_dir, acc) if cfg.reuse_stages else 0
    for i, stage in enumerate(stages):
        if staged and (stage.folder / "export" / "export.json").exists() and (cfg.resume or i < reused):
            carry = _read_carry(stage.folder)
            continue
        if staged and not cfg.resume and (stage.folder / "export").exists():
            raise RuntimeError(f"{stage.folder} already has an export; use resume=latest or a new output_dir")
        if staged and acc.is_main_process:
            stage.folder.mkdir(parents=True, exist_ok=True)
            (stage.folder / STAGE).write_text(json.dumps(stage.to_json(), indent=1))
        if carry is not None and i and stages[i - 1].data != stage.data:  # other data: its own stream from 0
            carry = {k: v for k, v in carry.items() if k != "data"}
        set_seed(cfg.trainer.seed + i, device_specific=False)
        trainer = Trainer(stage_config(cfg, stage, staged, i == len(stages) - 1), acc, stage.folder, carry=carry,
                          stage=stage)
        try:
            trainer.fit()
            carry = trainer.carry()
            if staged and acc.is_main_process:  # stage-derived state lives in the stage folder
                (stage.folder / CARRY).write_text(json.dumps(carry))
            acc.wait_for_everyone()
        finally:
            trainer.close()
        acc.free_memory()  # forget this stage's prepared modules/optimizers before the next stage
    if staged and acc.is_main_process:
        _copy_final_export(run_dir, stages[-1].folder)
        METHOD_CLASSES[cfg.method.name].finish(cfg, run_dir, stages)
    acc.wait_for_everyone()


# settings that do not change what a stage trains: where it runs and how it reports
REUSE_IGNORE = ("output_dir", "resume", "reuse_stages", "tags", "optimize_metric", "logger.", "data.num_workers",
                "trainer.num_threads", "trainer.progress_bar", "trainer.log_every_steps",
                "trainer.checkpoint_every_steps", "trainer.checkpoints_keep", "trainer.validat")


def stage_changes(cfg: DictConfig, stage: Stage, last: bool, source_run: Path) -> list[str]:
    """'key: old -> new' for every setting of `stage` (as this run would train it) that differs from the same stage
    of `source_run` (its config.yaml, the source's own paths mapped to this run's)."""
    from omegaconf import OmegaConf

    from distill.tracking import config_changes, flat_config, written_config

    old = OmegaConf.to_container(OmegaConf.load(stage_folder(source_run, stage.index, stage.name) / "config.yaml"))
    new = written_config(stage_config(cfg, stage, True, last))
    for c in (old, new):  # a stage never depends on later entries of a stage list (PAD's method.stages)
        if isinstance(c.get("method", {}).get("stages"), list):
            entries = c["method"].pop("stages")[:stage.index + 1]
            c["method"].update({f"stages[{j}]": e for j, e in enumerate(entries)})
    src, dst = str(old.get("output_dir")), str(new.get("output_dir"))
    a = {k: v.replace(src, dst) if isinstance(v, str) and src != "None" else v for k, v in flat_config(old).items()}
    b = flat_config(new)
    return [c for c in config_changes(a, b, ignore=()) if not c.split(":")[0].startswith(REUSE_IGNORE)]


def reuse_stages(cfg: DictConfig, stages: list[Stage], run_dir: Path, acc) -> int:
    """Copy the finished leading stages of the run `cfg.reuse_stages` whose settings equal this run's (export,
    carry, metrics, samples; not checkpoints) into this run's stage folders; return how many. Reuse stops at the
    first stage that is unfinished there, differs, or already exists here (said, with the differing keys); a run
    that can reuse none of them is a ConfigError naming why."""
    from distill.config import ConfigError

    source = Path(cfg.reuse_stages)
    if len(stages) < 2:
        raise ConfigError(f"reuse_stages={cfg.reuse_stages}: method {cfg.method.name!r} runs a single stage here; "
                          "reuse_stages takes finished stages of a staged run (Hyper-SD, PAD, progressive methods)")
    if not (source / "stages").is_dir():
        raise ConfigError(f"reuse_stages={cfg.reuse_stages}: not a staged run folder (no stages/ inside)")
    if source.resolve() == Path(run_dir).resolve():
        raise ConfigError(f"reuse_stages={cfg.reuse_stages} is this run's own folder: use resume=latest")
    n, why, copy_ = 0, "", []
    for i, stage in enumerate(stages):
        if stage.folder.exists():  # this run's own: finished (reused or trained) on an earlier launch, or not
            if cfg.resume and (stage.folder / "export" / "export.json").exists():
                n += 1
                continue
            why = f"{stage.folder} already exists here" + ("" if cfg.resume else " (resume=latest continues it)")
            break
        src = stage_folder(source, i, stage.name)
        if not (src / "export" / "export.json").exists() or not (src / "config.yaml").exists():
            why = f"stage {stage.name!r} is not finished in {source}"
            break
        changes = stage_changes(cfg, stage, i == len(stages) - 1, source)
        if changes:
            why = f"stage {stage.name!r} differs: " + "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
            break
        n += 1
        copy_.append(stage)
    if n == 0:
        raise ConfigError(f"reuse_stages={cfg.reuse_stages}: no stage to reuse ({why})")
    acc.wait_for_everyone()  # every rank decided on the same folders before any is written
    if acc.is_main_process:
        from omegaconf import OmegaConf

        from distill.tracking import written_config

        for stage in copy_:  # each stage assembled beside its folder, then renamed: a killed copy leaves no stage
            src, tmp = stage_folder(source, stage.index, stage.name), stage.folder.with_name(stage.folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in ("export", "samples"):
                if (src / name).is_dir():
                    shutil.copytree(src / name, tmp / name)
            for name in (CARRY, "metrics.jsonl"):
                if (src / name).exists():
                    shutil.copy2(src / name, tmp / name)
            (tmp / STAGE).write_text(json.dumps(stage.to_json(), indent=1))
            container = written_config(stage_config(cfg, stage, True, stage is stages[-1]))
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
            (tmp / "reused.json").write_text(json.dumps({"from": str(src.resolve())}, indent=1))
            tmp.rename(stage.folder)
    acc.wait_for_everyone()
    log.warning("reuse_stages: %d of %d stages copied from %s, %d finished here before (%s)", len(copy_),
                len(stages), source, n - len(copy_), why or "every stage matched")
    return n


def _read_carry(stage_dir: Path) -> dict | None:
    """What a finished stage handed on (None for a stage finished before stages carried their data position)."""
    path = stage_dir / CARRY
    return json.loads(path.read_text()) if path.exists() else None


def _copy_final_export(run_dir: Path, last_stage_dir: Path) -> None:
    """The run's export/ is the last stage's (copied, so it survives moving the run folder)."""
    dst = run_dir / "export"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(last_stage_dir / "export", dst)
