"""A latent perceptual distance of our own (the idea of E-LatentLPIPS, Kang et al., arXiv 2405.05967, written from
the paper): a VGG-like conv net that reads VAE latents directly (no early pooling: latents are already downsampled),
channel-normalised features at each level, non-negative linear heads on their squared differences, spatial means,
plus an L1 term on the latents. With `ensemble=True` the same random differentiable augmentation (translation,
flip, cutout) is applied to both inputs at every call, the paper's ensemble trick: a moving target for a generator
loss, so no single blind spot of the net can be exploited.

Trained by the `latent_lpips` method (distill/methods/latent_lpips.py) against a distance between decoded images,
never the metric the bench reports. Saved and loaded as a folder: `config.json` + `model.safetensors`;
`distill:tiny-latent-lpips` is the tiny world's (distill/assets/tiny/latent_lpips)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass
class LatentPerceptualConfig:
    in_channels: int = 4
    widths: list[int] = field(default_factory=lambda: [32, 64, 96])  # one level each; a stride-2 conv between
    convs_per_level: int = 2
    l1_weight: float = 0.1  # weight of mean |a - b| on the latents themselves
    info: dict = field(default_factory=dict)  # what it was trained on (VAE, data, target), for the record


class LatentPerceptual(nn.Module):
    """d(a, b) per sample: sum over levels of spatial-mean(w_l . (n(f_l(a)) - n(f_l(b)))^2) + l1 mean|a - b|."""

    def __init__(self, config: LatentPerceptualConfig | None = None):
        super().__init__()
        self.config = c = config or LatentPerceptualConfig()
        self.levels = nn.ModuleList()
        prev = c.in_channels
        for i, w in enumerate(c.widths):
            layers: list[nn.Module] = []
            for j in range(c.convs_per_level):
                stride = 2 if i > 0 and j == 0 else 1
                layers += [nn.Conv2d(prev, w, 3, stride=stride, padding=1), nn.SiLU()]
                prev = w
            self.levels.append(nn.Sequential(*layers))
        # LPIPS's linear heads, kept non-negative (softplus of a free parameter)
        self.head_logits = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in c.widths)

    def features(self, x: Tensor) -> list[Tensor]:
        out, h = [], x
        for level in self.levels:
            h = level(h)
            out.append(h)
        return out

    def forward(self, a: Tensor, b: Tensor, ensemble: bool = False,
                generators: list[torch.Generator] | None = None) -> Tensor:
        """Distances (B,) between latents `a` and `b` (both scaled as the UNet sees them); `ensemble`: through
        one random augmentation of both per sample (`generators`: one per sample)."""
        if ensemble:
            a, b = augment_pair(a, b, generators)
        dt = self.levels[0][0].weight.dtype
        fa, fb = self.features(a.to(dt)), self.features(b.to(dt))
        d = a.new_zeros(a.shape[0], dtype=torch.float32)
        for f0, f1, w in zip(fa, fb, self.head_logits):
            diff = (_unit(f0.float()) - _unit(f1.float())).pow(2)
            d = d + (F.softplus(w).view(1, -1, 1, 1) * diff).sum(1).mean(dim=(1, 2))
        return d + self.config.l1_weight * (a.float() - b.float()).abs().mean(dim=tuple(range(1, a.ndim)))

    # -- folders ------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(json.dumps(asdict(self.config), indent=1))
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, key: str = "method.perceptual") -> LatentPerceptual:
        from safetensors.torch import load_file

        folder = Path(resolve_perceptual(str(path), key))
        if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
            raise FileNotFoundError(f"{key}={str(path)!r}: not a latent perceptual net folder (needs {CONFIG} and "
                                    f"{WEIGHTS}; train one with +experiment=latent_lpips_tiny, see docs)")
        net = cls(LatentPerceptualConfig(**json.loads((folder / CONFIG).read_text())))
        net.load_state_dict(load_file(str(folder / WEIGHTS)))
        return net


def resolve_perceptual(name: str, key: str = "method.perceptual") -> str:
    """`distill:tiny-latent-lpips` -> the shipped tiny net; any other value is a local folder."""
    if name == "distill:tiny-latent-lpips":
        from distill.models.loader import ASSETS

        return str(ASSETS / "tiny" / "latent_lpips")
    if name.startswith("distill:"):
        raise FileNotFoundError(f"{key}={name!r}: unknown built-in (known: distill:tiny-latent-lpips)")
    return name


def _unit(f: Tensor) -> Tensor:
    """LPIPS's channel normalisation: each spatial position's feature vector to unit length."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def augment_pair(a: Tensor, b: Tensor, generators: list[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
    """The same random differentiable augmentation on both, per sample (from that sample's generator, so a batch
    split over processes draws alike): a translation of up to 1/8 of the side (reflect-padded), a horizontal flip
    with probability 1/2, and a cutout of a quarter-side square."""
    n, _, h, w = a.shape
    gens = generators if generators is not None else [None] * n
    shift, cut = max(1, h // 8), max(1, h // 4)
    padded = F.pad(torch.cat([a, b]), (shift, shift, shift, shift), mode="reflect")
    outs = []
    for i, g in enumerate(gens):
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        cy, cx = int(torch.randint(0, h - cut + 1, (), generator=g)), int(torch.randint(0, w - cut + 1, (), generator=g))
        x = padded[[i, n + i], :, shift + dy: shift + dy + h, shift + dx: shift + dx + w]
        if flip:
            x = x.flip(-1)
        mask = torch.ones(1, 1, h, w, device=a.device, dtype=x.dtype)
        mask[..., cy: cy + cut, cx: cx + cut] = 0
        outs.append(x * mask)
    out = torch.stack(outs)  # (n, 2, C, h, w)
    return out[:, 0], out[:, 1]
