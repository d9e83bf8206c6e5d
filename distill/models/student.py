"""A smaller UNet built from the teacher's config by a removal plan (SSD-1B / Segmind-Vega, arXiv 2401.02677).

The student keeps the teacher's channels, levels and block order; what a plan changes:
  down / up transformer layers  per block, an int or one count per layer (diffusers' asymmetric layout:
                                `transformer_layers_per_block` down, `reverse_transformer_layers_per_block` up);
                                0 on every layer of a cross-attention block drops the block's attentions (the block
                                becomes a DownBlock2D / UpBlock2D)
  mid block                     keep | resnet (`UNetMidBlock2D`: one ResNet, no attention, SSD-1B and Vega) | none
  layers_per_block              ResNets per block (an up block has one more, as in every diffusers UNet)

Every student module keeps its teacher name (transformer_blocks.0..k-1 are the teacher's first k), so weights are
copied by name wherever shapes fit; `build_student` reports what it copied, what it could not and what it dropped.

Presets reproduce the published layouts from SDXL's config (ComfyUI's model detection holds the same numbers):
  ssd1b  down [1, 2, 4], up [[4, 4, 10], [2, 1, 1], -], mid one ResNet  (1.3B of SDXL's 2.6B)
  vega   down [1, 1, 2], up [[2, 2, 2], [1, 1, 1], -], mid one ResNet  (0.74B)
On a teacher of another layout (the random tiny SDXL of the tests) a preset is fitted: blocks aligned from the
deepest, layers by index, each count clamped to the teacher's (so nothing is ever added).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

MID_BLOCKS = {"keep": None, "resnet": "UNetMidBlock2D", "none": None}

SDXL_LAYOUT = {"down": [[1, 1], [2, 2], [10, 10]], "up": [[10, 10, 10], [2, 2, 2], [1, 1, 1]]}
# None: a block without attention (its count is irrelevant)
PRESETS: dict[str, dict[str, Any]] = {
    "ssd1b": {"down": [None, [2, 2], [4, 4]], "up": [[4, 4, 10], [2, 1, 1], None], "mid_block": "resnet"},
    "vega": {"down": [None, [1, 1], [2, 2]], "up": [[2, 2, 2], [1, 1, 1], None], "mid_block": "resnet"},
}


@dataclass
class StudentPlan:
    """What to remove from the teacher (None: keep the teacher's)."""

    down_transformer_layers: Optional[list] = None  # per down block: int, list per layer, or None (the teacher's)
    up_transformer_layers: Optional[list] = None  # per up block: int, list per layer, or None
    mid_block: str = "keep"  # keep | resnet | none
    layers_per_block: Optional[Any] = None  # int (all blocks) or one per down block

    @classmethod
    def from_config(cls, c: Any) -> StudentPlan:
        """From `method.student` (preset, down_transformer_layers, up_transformer_layers, mid_block,
        layers_per_block); a preset fills the fields it defines, explicit fields win."""
        def plain(v):
            from omegaconf import OmegaConf

            return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v

        preset = PRESETS[c.preset] if getattr(c, "preset", None) else {}
        return cls(down_transformer_layers=plain(c.down_transformer_layers) or preset.get("down"),
                   up_transformer_layers=plain(c.up_transformer_layers) or preset.get("up"),
                   mid_block=c.mid_block if c.mid_block != "keep" or not preset else preset.get("mid_block", "keep"),
                   layers_per_block=plain(c.layers_per_block))


def _per_block(value, n: int) -> list:
    return [value] * n if isinstance(value, int) else list(value)


def teacher_layout(config: dict) -> dict[str, list[list[int]]]:
    """Transformer layers per layer of every down and up block of a diffusers UNet config (0 where a block has no
    attention)."""
    n = len(config["down_block_types"])
    lpb = _per_block(config["layers_per_block"], n)
    tl = _per_block(config.get("transformer_layers_per_block", 1), n)
    down = [[0] * lpb[i] if "CrossAttn" not in config["down_block_types"][i] else
            (_per_block(tl[i], lpb[i])) for i in range(n)]
    rev = config.get("reverse_transformer_layers_per_block")
    up_counts = list(rev) if rev is not None else list(reversed(tl))
    up = [[0] * (lpb[::-1][i] + 1) if "CrossAttn" not in config["up_block_types"][i] else
          _per_block(up_counts[i], lpb[::-1][i] + 1) for i in range(n)]
    return {"down": down, "up": up}


def _fit(requested: list | None, teacher: list[list[int]], from_end: bool, fitted: list[bool]) -> list[list[int]]:
    """Requested per-block counts against the teacher's: None keeps a block; lists are truncated or extended
    (last value) to the teacher's layer count; every count is clamped to the teacher's (a plan only removes)."""
    if requested is None:
        return [list(b) for b in teacher]
    req = list(requested)
    if len(req) != len(teacher):
        fitted[0] = True
        req = (req[-len(teacher):] if from_end else req[:len(teacher)]) if len(req) > len(teacher) else \
            ([None] * (len(teacher) - len(req)) + req if from_end else req + [None] * (len(teacher) - len(req)))
    out = []
    for want, have in zip(req, teacher):
        if want is None or max(have, default=0) == 0:
            out.append(list(have))
            continue
        per = _per_block(want, len(have))
        if len(per) != len(have):
            fitted[0] = True
            per = (per + [per[-1]] * len(have))[:len(have)]
        if any(w > h for w, h in zip(per, have)):
            fitted[0] = True
        out.append([min(int(w), h) for w, h in zip(per, have)])
    return out


def student_config(teacher_config: dict, plan: StudentPlan) -> dict:
    """The student's diffusers UNet2DConditionModel config: the teacher's with the plan's layout."""
    if plan.mid_block not in MID_BLOCKS:
        raise ValueError(f"mid_block={plan.mid_block!r}: expected keep | resnet | none")
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    n = len(cfg["down_block_types"])
    lpb = _per_block(cfg["layers_per_block"], n)
    if plan.layers_per_block is not None:
        new = _per_block(plan.layers_per_block, n)
        if len(new) != n or any(not 0 <= a <= b for a, b in zip(new, lpb)):
            raise ValueError(f"layers_per_block={plan.layers_per_block}: one count per down block, each between 0 "
                             f"and the teacher's {lpb}")
        lpb = new
        cfg["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else lpb
    have = teacher_layout({**cfg, "layers_per_block": lpb})  # the teacher's counts on the student's layers
    fitted = [False]
    down = _fit(plan.down_transformer_layers, have["down"], True, fitted)
    up = _fit(plan.up_transformer_layers, have["up"], False, fitted)
    if fitted[0]:
        log.warning("the removal plan was fitted to this teacher's layout (down %s, up %s)", down, up)
    cfg["down_block_types"] = [t if max(d, default=0) > 0 or "CrossAttn" not in t else t.replace("CrossAttn", "")
                               for t, d in zip(cfg["down_block_types"], down)]
    cfg["up_block_types"] = [t if max(u, default=0) > 0 or "CrossAttn" not in t else t.replace("CrossAttn", "")
                             for t, u in zip(cfg["up_block_types"], up)]
    # diffusers reads a block's count per layer (an int means all layers); blocks without attention keep 1
    down_cfg = [(d[0] if len(set(d)) == 1 else d) if max(d, default=0) > 0 else 1 for d in down]
    up_cfg = [list(u) if max(u, default=0) > 0 else [1] * len(u) for u in up]
    symmetric = all(isinstance(d, int) for d in down_cfg) and up_cfg == [[d] * len(u) for d, u in
                                                                         zip(reversed(down_cfg), up_cfg)]
    cfg["transformer_layers_per_block"] = down_cfg
    cfg["reverse_transformer_layers_per_block"] = None if symmetric else up_cfg
    removed = "mid_block_type" in cfg and cfg["mid_block_type"] is None  # a source with no mid block: none to add
    if plan.mid_block == "resnet" and not removed:
        cfg["mid_block_type"] = "UNetMidBlock2D"
    elif plan.mid_block == "none":
        cfg["mid_block_type"] = None
    return cfg


@dataclass
class CopyReport:
    """What `build_student` copied from the teacher, by parameter name."""

    copied: list[str]
    not_copied: list[str]  # student tensors left at their initialisation (no teacher tensor of that name and shape)
    dropped: list[str]  # teacher tensors with no place in the student

    def summary(self) -> dict:
        """Counts, and the dropped / not-copied tensors grouped by module (for export.json and logs)."""
        def modules(keys):
            out: dict[str, int] = {}
            for k in keys:
                parts = k.split(".")
                # the finest unit: one transformer layer, else one ResNet or attention, else the module
                cut = next((i + 2 for i, p in enumerate(parts) if p == "transformer_blocks"),
                           next((i + 2 for i, p in enumerate(parts) if p in ("resnets", "attentions")), len(parts) - 1))
                out[".".join(parts[:cut])] = out.get(".".join(parts[:cut]), 0) + 1
            return out

        return {"copied": len(self.copied), "not_copied": modules(self.not_copied), "dropped": modules(self.dropped)}


def copy_plan(student_shapes: dict[str, torch.Size], teacher_state: dict[str, torch.Tensor]) -> CopyReport:
    copied = [k for k, s in student_shapes.items() if k in teacher_state and teacher_state[k].shape == s]
    done = set(copied)
    return CopyReport(copied, [k for k in student_shapes if k not in done],
                      [k for k in teacher_state if k not in done])


def build_student(teacher_config: dict, teacher_state: dict[str, torch.Tensor], plan: StudentPlan,
                  dtype: torch.dtype = torch.float32):
    """(student UNet2DConditionModel, CopyReport). The student is built on the meta device and its tensors assigned
    from the teacher when every one of them has a teacher counterpart (no memory for a random initialisation of
    an SDXL-size model); otherwise it is initialised and the fitting tensors copied."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    cfg = student_config(teacher_config, plan)
    with init_empty_weights():
        shell = UNet2DConditionModel.from_config(cfg)
    report = copy_plan({k: v.shape for k, v in shell.state_dict().items()}, teacher_state)
    state = {k: teacher_state[k].detach().to(dtype).clone() for k in report.copied}
    if not report.not_copied:
        shell.load_state_dict(state, strict=True, assign=True)
        student = shell
    else:
        student = UNet2DConditionModel.from_config(cfg).to(dtype)
        student.load_state_dict(state, strict=False)
    return student, report


def count_parameters(config: dict) -> int:
    """Parameters of a UNet2DConditionModel config, counted on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return sum(p.numel() for p in UNet2DConditionModel.from_config(config).parameters())


def tap_names(teacher, student, level: str = "block") -> list[str]:
    """Submodules whose outputs the feature loss compares, present in both networks with the same role.
    block: every down block, the mid block and every up block (SSD-1B's hook points at block granularity).
    layer: every ResNet and attention of every block (SSD-1B's per-layer losses), and the mid block's output."""
    if level not in ("block", "layer"):
        raise ValueError(f"feature level {level!r}: expected block | layer")
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    names = []
    for kind in ("down_blocks", "mid_block", "up_blocks"):
        if kind == "mid_block":
            cand = ["mid_block"]
        elif level == "block":
            cand = [f"{kind}.{i}" for i in range(len(getattr(student, kind)))]
        else:
            cand = [f"{kind}.{i}.{part}.{j}" for i, b in enumerate(getattr(student, kind))
                    for part in ("resnets", "attentions") for j in range(len(getattr(b, part, None) or []))]
        names += [n for n in cand if n in s_mods and n in t_mods and s_mods[n] is not None and t_mods[n] is not None]
    return names
