"""Segmented (phased) consistency distillation: PCM (arXiv 2405.18407), Hyper-SD's TSCD (arXiv 2404.13686), with
TCD's (arXiv 2402.19159) shared random target time as an option.

LCD's skip grid t_n = (n + 1) k - 1 (k = T / N, n = 0..N-1) is cut into K segments of N / K grid points. A draw n in
segment j = n // (N / K) has the lower edge e_j = j T / K - 1 (e_0 = 0, the point where LCD's clamped teacher step
lands) and the upper edge e_{j+1}. The edges are chosen so that the upper edges e_1..e_K are exactly the trailing DDIM
timesteps of a K-step sampler (K = 4: 999, 749, 499, 249): they are grid points whenever K divides N
(`method.num_segments` must divide `method.num_ddim_timesteps`), and a K-segment student samples edge to edge with
DDIMScheduler(timestep_spacing="trailing"), deterministic, its last step landing on the clean end.

One step: the teacher takes LCD's guided DDIM step t_n -> t_{n-1} (cond + uncond in one 2B forward, LCM-form w); the
student's prediction at (x_{t_n}, t_n) jumps (DDIM with its own x0 and eps) to the edge; the target network's
prediction at (x_{t_{n-1}}, t_{n-1}) jumps to the same edge, except that when t_{n-1} is the edge the target is
x_{t_{n-1}} itself. A jump to e_0 = 0 lands on the clean end (the predicted x0, abar = 1), as LCD's boundary does.
Pseudo-Huber (or L2) between the two.

`method.boundary`: "ddim" (PCM: the jump itself, c_skip = 0, c_out = 1) or "lcm" (LCD's boundary scalings of the
distance to the edge, f = c_skip(t - e) x_t + c_out(t - e) jump). K = 1 with "lcm" is LCD exactly.
`method.target`: "edge" (PCM) or "tcd": both branches jump to one random s in [e_j, t_{n-1}] instead of the edge.

Trajectory-state data (MLCM, arXiv 2406.05768): with `method.trajectory` x_{t_n} is not a data latent noised to t_n
but the state the teacher's own guided DDIM solve from pure noise reached at t_n (pairs shards written with
`prepare pairs --states` at N steps and CFG w + 1: their timesteps are the skip grid), so a run needs prompts only
(`method.pairs.prompts`: the run writes them; data/images_read stays 0).

Progressive segments (Hyper-SD's TSCD): `method.segment_stages: [8, 4, 2, 1]` runs one stage per K on the generic
staging (distill.stages), each student initialised from the previous stage's export (the LoRA continued, or the
full student and its EMA), the last stage's export the run's.

Networks as LCD: a LoRA student (the teacher is the same UNet with adapters off; target = the student under
stop-grad; w fixed) or a full student (zero-initialised w-embedding, EMA target).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from distill.config import ConfigError, LoraConfig
from distill.methods.pairs import PairsConfig, check_pairs, ensure_pairs, with_shards
from distill.diffusion import Denoiser, UNetCond, add_noise, inference_timesteps
from distill.methods.base import Batch
from distill.methods.lcd import LCD, check_guidance_and_loss, pseudo_huber
from distill.models.loader import stored_fp32_state
from distill.profiling import span
from distill.sampler import SamplerSpec


@dataclass
class PCMConfig:
    name: str = "pcm"
    lora: LoraConfig = field(default_factory=LoraConfig)  # disabled: full-UNet student, w-embedding, EMA target
    num_ddim_timesteps: int = 40  # N, the skip grid (PCM's SDXL script: 40)
    num_segments: int = 4  # K phases; the student samples K steps edge to edge (must divide N)
    boundary: str = "ddim"  # ddim (PCM: the DDIM jump to the edge) | lcm (LCD's c_skip / c_out of t - edge)
    target: str = "edge"  # edge (PCM / TSCD) | tcd (both branches jump to one random s inside the segment)
    w_min: float = 3.0  # LCM-form guidance scale w (standard scale w + 1); fixed when w_min == w_max
    w_max: float = 15.0
    inference_w: Optional[float] = None  # w for validation grids and the card (full student: within [w_min, w_max]);
    #   None: 7.5 clamped into [w_min, w_max]
    w_embedding_dim: int = 256
    loss: str = "huber"  # huber | l2
    huber_c: float = 1e-3
    timestep_scaling: float = 10.0  # boundary=lcm only
    sigma_data: float = 0.5  # boundary=lcm only
    ema_decay: float = 0.95  # per step; an alias of ema_half_life_images, which wins when set
    ema_half_life_images: Optional[float] = None
    trajectory: bool = False  # x_t from the teacher's own solve (pairs with states), not noised data (MLCM)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # trajectory: written by the run when prompts is set
    segment_stages: list[int] = field(default_factory=list)  # TSCD: K per stage, e.g. [8, 4, 2, 1], each stage from
    #   the previous one's student (empty: one stage at num_segments)
    segment_steps: list[int] = field(default_factory=list)  # steps per TSCD stage: one value for all, or one per
    #   stage (empty: trainer.max_steps each)


def segment_edges(num_train_timesteps: int, num_segments: int) -> Tensor:
    """The K + 1 segment edges, ascending: e_0 = 0, e_j = j T / K - 1. e_1..e_K are points of
    `lcm_skip_grid(T, N)` and equal the K trailing DDIM timesteps (reversed) when K divides N and N divides T."""
    T, K = num_train_timesteps, num_segments
    edges = torch.arange(K + 1, dtype=torch.long) * (T // K) - 1
    return edges.clamp(min=0)


def lower_edge(index: Tensor, num_train_timesteps: int, num_ddim_timesteps: int, num_segments: int) -> Tensor:
    """The lower edge of each grid index's segment (index n lies in segment n // (N / K))."""
    per = num_ddim_timesteps // num_segments
    return segment_edges(num_train_timesteps, num_segments).to(index.device)[index // per]


class PCM(LCD):
    """LCD's networks, guidance and EMA (inherited), with the segmented objective and a DDIM-trailing sampler."""

    Config = PCMConfig

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.method
        check_guidance_and_loss(m)
        if m.boundary not in ("ddim", "lcm"):
            raise ConfigError(f"method.boundary={m.boundary!r}: expected ddim (PCM) | lcm (LCD's c_skip / c_out)")
        if m.target not in ("edge", "tcd"):
            raise ConfigError(f"method.target={m.target!r}: expected edge (PCM) | tcd (a random s in the segment)")
        if m.num_ddim_timesteps < 1 or 1000 % m.num_ddim_timesteps:
            raise ConfigError(f"method.num_ddim_timesteps={m.num_ddim_timesteps} must divide 1000 (the skip grid "
                              "t_n = (n + 1) * 1000 / N - 1)")
        if m.num_segments < 1 or m.num_ddim_timesteps % m.num_segments:
            raise ConfigError(f"method.num_segments={m.num_segments} must divide method.num_ddim_timesteps="
                              f"{m.num_ddim_timesteps}: the segment edges j * 1000 / K - 1 (the K-step trailing DDIM "
                              "timesteps the student samples) must be points of the skip grid")
        for k in m.segment_stages:
            if k < 1 or m.num_ddim_timesteps % k:
                raise ConfigError(f"method.segment_stages has {k}: every K must divide method.num_ddim_timesteps="
                                  f"{m.num_ddim_timesteps}")
        if m.segment_steps and len(m.segment_steps) not in (1, len(m.segment_stages)):
            raise ConfigError(f"method.segment_steps={list(m.segment_steps)}: one value, or one per "
                              f"method.segment_stages={list(m.segment_stages)}")
        if any(n < 1 for n in m.segment_steps):
            raise ConfigError(f"method.segment_steps={list(m.segment_steps)}: steps must be >= 1")
        if m.trajectory:
            if cfg.data.kind != "pairs":
                raise ConfigError(f"method.trajectory=true reads the teacher's trajectory from pair shards: data.kind="
                                  f"{cfg.data.kind}, expected pairs (written by `prepare pairs --states`)")
            if m.w_min != m.w_max:
                raise ConfigError(f"method.trajectory=true: the trajectories were solved at one CFG scale, so w is "
                                  f"fixed: set method.w_min = method.w_max (now {m.w_min}, {m.w_max})")
            p = m.pairs
            if p.prompts is not None:
                check_pairs(with_shards(p, cfg), "method.pairs")
                if not p.states or p.solver != "ddim" or p.solver_steps != m.num_ddim_timesteps:
                    raise ConfigError(f"method.pairs: trajectory pairs need states=true, solver=ddim and solver_steps="
                                      f"method.num_ddim_timesteps={m.num_ddim_timesteps} (the skip grid is the solve's "
                                      "timesteps)")
                if p.guidance_scale is not None and p.guidance_scale != m.w_min + 1:
                    raise ConfigError(f"method.pairs.guidance_scale={p.guidance_scale}: the trajectory's CFG must be "
                                      f"the teacher step's, w + 1 = {m.w_min + 1}")

    @classmethod
    def plan(cls, cfg, run_dir):
        """One stage, or one per K of `method.segment_stages` (TSCD), each from the previous stage's export."""
        from distill.stages import Stage, stage_folder

        m = cfg.method
        if not m.segment_stages:
            return super().plan(cfg, run_dir)
        stages, ks = [], list(m.segment_stages)
        steps = list(m.segment_steps) * (len(ks) if len(m.segment_steps) == 1 else 1)
        for i, k in enumerate(ks):
            info = {"student_init": str(stages[-1].folder / "export")} if stages else {}
            trainer = {"max_steps": int(steps[i])} if steps else {}
            stages.append(Stage(f"k{k}", i, stage_folder(run_dir, i, f"k{k}"), info=info, trainer=trainer,
                                method={"num_segments": int(k), "segment_stages": [], "segment_steps": []}))
        return stages

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        init = (stage.info.get("student_init") if stage is not None else None)
        if init:
            self.load_student(init)
        if m.trajectory and m.pairs.prompts is not None:  # write the trajectories if they are not there yet
            from distill.models.adapters import adapters_disabled

            with adapters_disabled(self.teacher) if self.lora else contextlib.nullcontext():
                ensure_pairs(with_shards(m.pairs, cfg), cfg, self.teacher, float(m.w_min) + 1.0)

    def load_student(self, export_dir: str) -> None:
        """Continue the student of an earlier stage's export: its LoRA, or its full UNet (and the EMA target)."""
        from distill.models.adapters import load_lora
        from distill.models.loader import load_unet

        if self.lora:
            load_lora(self.student, str(Path(export_dir) / "lora"))
            return
        state = load_unet(str(Path(export_dir) / "unet"), torch.float32, self.device).state_dict()
        self.student.load_state_dict(state)
        self.ema.model.load_state_dict(state)

    # -- the objective -----------------------------------------------------------------------------------------
    def _jump(self, unet, x: Tensor, t: Tensor, to: Tensor, cond: UNetCond) -> Tensor:
        """The network's prediction at (x, t) moved by DDIM to `to` (to = 0: the clean end, x0 itself), with the
        boundary parametrisation of `method.boundary` (lcm: the contract's phased consistency function)."""
        m = self.cfg.method
        net = Denoiser(unet, self.schedule)
        if m.boundary == "lcm":
            return net.consistency(x, t, cond, to, timestep_scaling=m.timestep_scaling, sigma_data=m.sigma_data)
        return net.jump(x, t, torch.where(to <= 0, -1, to), cond)  # t < 0: abar = 1, exactly x0

    def targets_of(self, batch: Batch, idx: Tensor, s: Tensor) -> Tensor:
        """Where both branches jump: the lower edge of n's segment, or (target=tcd) a shared random timestep in
        [edge, t_{n-1}]."""
        m = self.cfg.method
        edge = lower_edge(idx, self.schedule.num_train_timesteps, m.num_ddim_timesteps, m.num_segments)
        if m.target == "edge":
            return edge
        r = batch.randint("s", 0, 2**31 - 1, idx.device)
        return edge + r % (s - edge + 1)

    def losses(self, batch: Batch, phase: str, step: int):
        m = self.cfg.method
        x0, cond = batch.latents, batch.cond
        dev = x0.device
        # the same draws (tags) as LCD: with K = 1 and boundary=lcm the loss is LCD's, bit for bit
        idx = batch.randint("index", 0, m.num_ddim_timesteps, dev)
        t = self.grid[idx]
        s = (t - self.k).clamp(min=0)  # t_{n-1}; the bottom point clamps to 0 as in LCD
        eps = batch.randn("eps", tuple(x0.shape[1:]), dev)
        x_t = batch.state_at(t) if m.trajectory else add_noise(x0, eps, t, self.schedule)
        w = self._w(batch, dev)
        student_cond = self._cond(cond, w)
        to = self.targets_of(batch, idx, s)
        with torch.no_grad():
            with span("teacher"):  # LCD's teacher step: cond + uncond in one 2B forward, fp32 solver arithmetic
                x_s = self.teacher_denoiser().guided_jump(x_t, t, s, cond, cond.zeros_like(), w).float()
            with span("target"):
                if self.lora:
                    target = self._jump(self.student, x_s, s, to, student_cond)
                else:  # the EMA copy is not Accelerate-prepared: autocast it as the student is
                    with self.autocast():
                        target = self._jump(self.ema.model, x_s, s, to, student_cond)
            at_edge = (s == to).view((-1,) + (1,) * (x_s.ndim - 1))
            target = torch.where(at_edge, x_s.to(target.dtype), target)  # the boundary condition: x_{t_{n-1}} itself
        with span("student"):
            pred = self._jump(self.modules["student"], x_t, t, to, student_cond)
        if m.loss == "huber":
            loss = pseudo_huber(pred.float(), target.float(), m.huber_c)
        else:
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        return {"loss": loss}

    # -- sampling and export -----------------------------------------------------------------------------
    def upper_edges(self) -> Tensor:
        """The K segment tops, descending: the timesteps a K-step DDIM-trailing sampler visits."""
        m = self.cfg.method
        return segment_edges(self.schedule.num_train_timesteps, m.num_segments)[1:].flip(0)

    def sampler(self) -> SamplerSpec:
        """DDIMScheduler on trailing timesteps from T - 1, deterministic, no CFG (it is distilled in; a full
        student's w-embedding gets guidance_scale - 1); at K steps it visits exactly the segment edges."""
        m = self.cfg.method
        steps = sorted({n for n in (1, 2, 4, 8) if n <= m.num_ddim_timesteps} | {m.num_segments})
        return SamplerSpec("ddim", tuple(steps), 1.0 if self.lora else self.inference_w() + 1.0)

    def export_name(self) -> str:
        return "pcm"

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from distill.export import export_student

        m = self.cfg.method
        assert torch.equal(self.upper_edges(), inference_timesteps(m.num_segments, "trailing",
                                                                   self.schedule.num_train_timesteps))
        info = {"method": self.export_name() + ("-lora" if self.lora else ""), "teacher": self.cfg.model.pretrained,
                "num_segments": m.num_segments, "num_ddim_timesteps": m.num_ddim_timesteps, "arch": self.comps.arch}
        export_student(self.student, Path(out_dir), lora=self.lora, dtype=dtype, info=info, sampler=self.sampler(),
                       base_path=self.comps.path,
                       lora_base=stored_fp32_state(self.student, self.comps) if self.lora else None)

