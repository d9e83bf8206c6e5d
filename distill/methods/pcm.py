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

Guidance (`method.cfg_free`, PCM's `--not_apply_cfg_solver`): the teacher's step is its conditional prediction alone
(no CFG distilled in) and `method.uncond_prob` of the samples train with the empty prompt (all-zero embeddings), so
the student learns the unconditional consistency function too and keeps classifier-free guidance and negative prompts
usable at inference: the export samples with the pipeline's own CFG at `method.inference_guidance_scale`. A full
student then has no w-embedding.

Adversarial term (PCM, `method.gan_weight` > 0): a discriminator of small trainable heads on the FROZEN teacher's
encoder features at every down block and the mid block (`feature_taps.frozen_encoder_discriminator`), text
conditioned. Real = the target, fake = the student's prediction, both at the segment edge, re-noised by the forward
process from the edge to one random t in [edge, edge + T / K). Hinge losses: D's relu(1 - D(real)) + relu(1 + D(fake)),
G's gan_weight x relu(1 - D(fake)) on top of the consistency loss. D and G alternate: a "d" phase then a "g" phase in
every step, on the same batch (the g phase reuses the d phase's teacher step and target, computed once). A LoRA
student's discriminator reads a frozen copy of the teacher's encoder taken before the adapters were added (the
student's own blocks would run its adapters, and a gradient-checkpointed recompute could not switch them off).

Progressive teachers (`method.segment_teacher`): "original" keeps the frozen teacher in every TSCD stage; "previous"
(Hyper-SD) makes stage i's exported student (its fused UNet, frozen) the teacher of stage i + 1, stepped without CFG
(its guidance is distilled in; a full student's at the same w).

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
from distill.methods.pairs import PairsConfig, check_pairs, ensure_pairs, shards_key, with_shards
from distill.diffusion import Denoiser, UNetCond, add_noise, inference_timesteps, renoise, weight_dtype
from distill.methods.base import Batch
from distill.methods.gan import frozen
from distill.methods.lcd import LCD, check_guidance_and_loss, pseudo_huber
from distill.models.loader import frozen_dtype, stored_fp32_state
from distill.optim import OptimizerSpec
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
    segment_teacher: str = "original"  # TSCD: original (the frozen teacher in every stage) | previous (Hyper-SD:
    #   stage i's student is stage i + 1's teacher)
    cfg_free: bool = False  # PCM's CFG-free distillation: the teacher step without CFG, CFG kept for inference
    uncond_prob: float = 0.1  # cfg_free: share of samples trained on the empty prompt (the branch CFG subtracts)
    inference_guidance_scale: float = 2.0  # cfg_free: the pipeline's CFG scale for validation grids and the card
    gan_weight: float = 0.0  # PCM's adversarial term's weight (0: off; PCM: 0.1)
    gan_lr: Optional[float] = None  # the discriminator heads' lr (null: optim.lr)
    gan_head_channels: int = 64  # width of each head on the frozen teacher's encoder features


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
        if m.segment_teacher not in ("original", "previous"):
            raise ConfigError(f"method.segment_teacher={m.segment_teacher!r}: expected original (the frozen teacher in "
                              "every TSCD stage) | previous (Hyper-SD: the previous stage's student)")
        if not 0.0 <= m.uncond_prob < 1.0:
            raise ConfigError(f"method.uncond_prob={m.uncond_prob}: expected a share in [0, 1)")
        if m.cfg_free and m.trajectory:
            raise ConfigError("method.cfg_free=true with method.trajectory=true: the trajectories were solved WITH CFG "
                              "(their guidance is in every state); CFG-free distillation needs noised data latents")
        if m.cfg_free and m.inference_guidance_scale < 1.0:
            raise ConfigError(f"method.inference_guidance_scale={m.inference_guidance_scale}: the pipeline's CFG scale "
                              "(1: no guidance) must be >= 1")
        if m.gan_weight < 0:
            raise ConfigError(f"method.gan_weight={m.gan_weight} must be >= 0 (0: no adversarial term)")
        if m.gan_weight > 0 and m.gan_head_channels < 1:
            raise ConfigError(f"method.gan_head_channels={m.gan_head_channels} must be >= 1")
        if m.gan_lr is not None and m.gan_lr <= 0:
            raise ConfigError(f"method.gan_lr={m.gan_lr} must be > 0 (null: optim.lr)")
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
        m = cfg.method
        # before LCD adds a LoRA student's adapters to the teacher's UNet: the discriminator's copy has none
        d = self._discriminator(cfg, comps, device) if m.gan_weight > 0 else None
        super().__init__(cfg, comps, device, stage)
        init = (stage.info.get("student_init") if stage is not None else None)
        if init:
            self.load_student(init)
        self.previous = None  # Hyper-SD's progressive teacher: the previous stage's student, fused and frozen
        if init and m.segment_teacher == "previous":
            from distill.models.loader import load_unet

            self.previous = load_unet(str(Path(init) / "unet"), frozen_dtype(cfg, device), device)
            self.previous.requires_grad_(False).eval()
        self.discriminator = self.d_raw = d
        self._shared: dict = {}  # the d phase's teacher step and target, reused by the g phase of the same step
        if d is not None:
            self.modules["d"] = d
        if m.trajectory and m.pairs.prompts is not None:  # write the trajectories if they are not there yet
            from distill.models.adapters import adapters_disabled

            with adapters_disabled(self.teacher) if self.lora else contextlib.nullcontext():
                ensure_pairs(with_shards(m.pairs, cfg), cfg, self.teacher, float(m.w_min) + 1.0,
                             shards_key(m.pairs))

    @staticmethod
    def _discriminator(cfg, comps, device):
        """PCM's D: trainable heads on the frozen teacher's encoder at every level. A full student's teacher is its
        own frozen UNet (shared, no copy); a LoRA student's teacher is the student's UNet with adapters off, so D
        gets a frozen copy of the encoder made before the adapters exist."""
        from distill.methods.discriminator import latent_side
        from distill.methods.feature_taps import frozen_encoder_discriminator

        m = cfg.method
        d = frozen_encoder_discriminator(comps.unet, latent_side(comps, cfg.data.resolution), m.gan_head_channels,
                                         share=not m.lora.enabled).to(device)
        if cfg.trainer.gradient_checkpointing:
            d.net.enable_gradient_checkpointing()
        return d.train()

    def w_input(self) -> bool:
        return super().w_input() and not self.cfg.method.cfg_free

    def optimizers(self) -> list[OptimizerSpec]:
        """G alone; with the adversarial term D first, then G, every step (each its own optimizer and lr)."""
        g = OptimizerSpec("g", [{"params": self.trainable}], primary=True)
        if self.discriminator is None:
            return [g]
        lr = self.cfg.method.gan_lr
        d = OptimizerSpec("d", [{"params": list(self.discriminator.parameters())}],
                          overrides={} if lr is None else {"lr": float(lr)})
        return [d, g]

    def phase_scope(self, phase: str):
        """The g phase holds D's heads frozen over its forwards and backwards (gan.frozen)."""
        return frozen(self.d_raw) if phase == "g" and self.d_raw is not None else contextlib.nullcontext()

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

    def _train_cond(self, batch: Batch, dev) -> UNetCond:
        """The batch's prompts; cfg_free: `uncond_prob` of them replaced by the empty prompt (all-zero embeddings)."""
        m, cond = self.cfg.method, batch.cond
        if not m.cfg_free or m.uncond_prob <= 0:
            return cond
        drop = batch.rand("uncond", dev) < m.uncond_prob
        empty = cond.zeros_like()

        def pick(a, b):
            return None if a is None else torch.where(drop.view((-1,) + (1,) * (a.ndim - 1)), b, a)

        return UNetCond(pick(cond.encoder_hidden_states, empty.encoder_hidden_states),
                        pick(cond.text_embeds, empty.text_embeds), cond.time_ids, cond.timestep_cond)

    def _teacher_step(self, x_t: Tensor, t: Tensor, s: Tensor, cond: UNetCond, student_cond: UNetCond,
                      w: Tensor) -> Tensor:
        """x_{t_{n-1}}: one DDIM step of the teacher, fp32 solver arithmetic around the network."""
        if self.previous is not None:  # Hyper-SD: the previous stage's student, its guidance distilled in
            return Denoiser(self.previous, self.schedule).jump(x_t, t, s, student_cond).float()
        if self.cfg.method.cfg_free:  # the conditional (or, for dropped prompts, unconditional) ODE, no CFG
            return self.teacher_denoiser().jump(x_t, t, s, cond).float()
        # LCD's step: cond + uncond in one 2B forward, LCM-form w
        return self.teacher_denoiser().guided_jump(x_t, t, s, cond, cond.zeros_like(), w).float()

    def _pair(self, batch: Batch, step: int):
        """What both phases need: x_t, t, the edge `to`, the student's condition and the target at the edge. The
        target is computed once per batch and step (the d phase's, reused by the g phase: neither the student nor
        its EMA changes between the two)."""
        m = self.cfg.method
        x0 = batch.latents
        dev = x0.device
        key = (step, id(batch))
        if key in self._shared:
            return self._shared.pop(key)
        # the same draws (tags) as LCD: with K = 1 and boundary=lcm the loss is LCD's, bit for bit
        idx = batch.randint("index", 0, m.num_ddim_timesteps, dev)
        t = self.grid[idx]
        s = (t - self.k).clamp(min=0)  # t_{n-1}; the bottom point clamps to 0 as in LCD
        eps = batch.randn("eps", tuple(x0.shape[1:]), dev)
        x_t = batch.state_at(t) if m.trajectory else add_noise(x0, eps, t, self.schedule)
        w = self._w(batch, dev)
        cond = self._train_cond(batch, dev)
        student_cond = self._cond(cond, w)
        to = self.targets_of(batch, idx, s)
        with torch.no_grad():
            with span("teacher"):
                x_s = self._teacher_step(x_t, t, s, cond, student_cond, w)
            with span("target"):
                if self.lora:
                    with self.lora_fused(self.student):
                        target = self._jump(self.student, x_s, s, to, student_cond)
                else:  # the EMA copy is not Accelerate-prepared: autocast it as the student is
                    with self.autocast():
                        target = self._jump(self.ema.model, x_s, s, to, student_cond)
            at_edge = (s == to).view((-1,) + (1,) * (x_s.ndim - 1))
            target = torch.where(at_edge, x_s.to(target.dtype), target)  # the boundary condition: x_{t_{n-1}} itself
        out = (x_t, t, to, cond, student_cond, target)
        if self.discriminator is not None:  # keep this step's micro-batches only
            self._shared = {k: v for k, v in self._shared.items() if k[0] == step}
            self._shared[key] = out
        return out

    def _d_logits(self, net, xs: list[Tensor], to: Tensor, cond: UNetCond, batch: Batch, tags: list[str]) -> Tensor:
        """D's logits of each x in `xs` (at the edge `to`), re-noised to t ~ U[to, to + T / K) (one draw per sample,
        shared by the real and the fake side), conditioned on the prompt (the teacher's condition: no w-embedding).
        All of `xs` go through `net` as ONE batch (a DDP-wrapped D may run once per backward)."""
        m = self.cfg.method
        T = self.schedule.num_train_timesteps
        r = batch.randint("t_gan", 0, T // m.num_segments, to.device)
        t_gan = (to + r).clamp(max=T - 1)
        start = torch.where(to <= 0, -1, to)  # the bottom edge is the clean end (abar = 1)
        shape = tuple(xs[0].shape[1:])
        x = torch.cat([renoise(x_e.float(), start, t_gan, batch.randn(f"eps_gan_{tag}", shape, to.device),
                               self.schedule) for x_e, tag in zip(xs, tags)])
        c = cond
        for _ in xs[1:]:
            c = c.cat(cond)
        dt = weight_dtype(self.d_raw.net)
        with self.autocast():
            return net(x.to(dt), t_gan.repeat(len(xs)), c.to(dtype=dt)).float()

    def losses(self, batch: Batch, phase: str, step: int):
        m = self.cfg.method
        x_t, t, to, cond, student_cond, target = self._pair(batch, step)
        if phase == "d":  # hinge: real = the target, fake = the student's prediction, both re-noised from the edge
            with torch.no_grad(), span("student"), self.lora_fused(self.student):
                pred = self._jump(self.student, x_t, t, to, student_cond)
            with span("d"):
                l_real, l_fake = self._d_logits(self.modules["d"], [target, pred], to, cond, batch,
                                                ["real", "fake"]).chunk(2)
            loss_d = torch.relu(1.0 - l_real).mean() + torch.relu(1.0 + l_fake).mean()
            return {"loss": loss_d, "logit_real": l_real.detach().mean(), "logit_fake": l_fake.detach().mean()}
        with span("student"):
            pred = self._jump(self.modules["student"], x_t, t, to, student_cond)
        if m.loss == "huber":
            loss = pseudo_huber(pred.float(), target.float(), m.huber_c)
        else:
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        if self.discriminator is None:
            return {"loss": loss}
        with span("d"):  # D frozen by phase_scope("g") through backward: its raw module
            loss_gan = torch.relu(1.0 - self._d_logits(self.d_raw, [pred], to, cond, batch, ["fake"])).mean()
        return {"loss": loss + m.gan_weight * loss_gan, "loss_consistency": loss.detach(), "loss_gan": loss_gan.detach()}

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
        if m.cfg_free:  # the pipeline's own CFG with the empty (or a negative) prompt as the unconditional branch
            return SamplerSpec("ddim", tuple(steps), float(m.inference_guidance_scale))
        return SamplerSpec("ddim", tuple(steps), 1.0 if self.lora else self.inference_w() + 1.0)

    def export_name(self) -> str:
        return "pcm"

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from distill.export import export_student

        m = self.cfg.method
        assert torch.equal(self.upper_edges(), inference_timesteps(m.num_segments, "trailing",
                                                                   self.schedule.num_train_timesteps))
        info = {"method": self.export_name() + ("-lora" if self.lora else ""), "teacher": self.cfg.model.pretrained,
                "num_segments": m.num_segments, "num_ddim_timesteps": m.num_ddim_timesteps, "arch": self.comps.arch,
                "cfg_free": bool(m.cfg_free)}
        export_student(self.student, Path(out_dir), lora=self.lora, dtype=dtype, info=info, sampler=self.sampler(),
                       base_path=self.comps.path,
                       lora_base=stored_fp32_state(self.student, self.comps) if self.lora else None)

