"""Reward models for human-feedback fine-tuning (Hyper-SD's ReFL stage): images and prompts in, one score per
image out, differentiable in the images.

One interface, `RewardModel.forward(images, prompts) -> scores (N,)`, images (N, 3, H, W) in [-1, 1] as the VAE
decodes them (each model resizes and normalises for itself). Three kinds, each a folder with `reward.json`
({"kind": ...}) loaded by `load_reward`:

  agreement  the tiny world's image-prompt agreement model (`distill:tiny-reward`, distill/assets/tiny/reward): a
             GroupNorm CNN image tower and a bag-of-words prompt tower, score = scale x cosine. Trained here
             (`python -m distill.models.reward train`) contrastively over the world's 24 prompts on images of its
             own split ("reward") and seed: NOT the shipped evaluator (another architecture, data and seed), so a
             student cannot be tuned on the bench's own judge.
  clip       CLIP image-text agreement, logit_scale x cosine (PickScore's and HPS's form): any transformers
             CLIPModel folder (`clip/`, with its tokenizer), e.g. a local copy of yuvalkirstain/PickScore_v1.
  aesthetic  the LAION improved aesthetic predictor's layout: an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, keys
             layers.0 / .2 / .4 / .6 / .7) on the L2-normalised CLIP image embedding; `clip/` a
             CLIPVisionModelWithProjection folder, `head.safetensors` the MLP (the released .pth converted).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG = "reward.json"
TINY = "distill:tiny-reward"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardModel(nn.Module):
    """scores = model(images in [-1, 1] (N, 3, H, W), prompts (N strings)), float32 (N,); higher is better."""

    kind = ""

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> None:
        raise NotImplementedError


# -- the tiny world's agreement model -------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class AgreementReward(RewardModel):
    """Image tower (GroupNorm CNN, 32 -> 16 -> 8 -> 4, mean pool) and prompt tower (mean of word embeddings, an
    unknown word maps to index 0), both projected to `dim`; score = exp(log_scale) x cosine."""

    kind = "agreement"

    def __init__(self, vocab: list[str], dim: int = 64, widths: tuple[int, ...] = (32, 64, 64), resolution: int = 32):
        super().__init__()
        self.vocab, self.dim, self.widths, self.resolution = list(vocab), dim, tuple(widths), resolution
        self.index = {w: i + 1 for i, w in enumerate(self.vocab)}
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 1), nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1), nn.SiLU()]
            c = w
        self.image_tower = nn.Sequential(*layers)
        self.image_proj = nn.Linear(c, dim)
        self.word_emb = nn.Embedding(len(self.vocab) + 1, dim)
        self.text_proj = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.log_scale = nn.Parameter(torch.tensor(2.3))  # exp: about 10

    def embed_images(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return F.normalize(self.image_proj(self.image_tower(x).mean(dim=(2, 3))), dim=-1)

    def embed_prompts(self, prompts: list[str]) -> Tensor:
        dev = self.log_scale.device
        out = []
        for p in prompts:
            ids = torch.tensor([self.index.get(w, 0) for w in words(p)] or [0], device=dev)
            out.append(self.word_emb(ids).mean(0))
        return F.normalize(self.text_proj(torch.stack(out)), dim=-1)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.log_scale.exp() * (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"kind": self.kind, "vocab": self.vocab, "dim": self.dim, "widths": list(self.widths),
               "resolution": self.resolution, "info": getattr(self, "info", {})}
        (out / CONFIG).write_text(json.dumps(cfg, indent=1))
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"))

    @classmethod
    def from_folder(cls, folder: Path, cfg: dict) -> AgreementReward:
        from safetensors.torch import load_file

        net = cls(cfg["vocab"], cfg["dim"], tuple(cfg["widths"]), cfg["resolution"])
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        net.info = cfg.get("info", {})
        return net


# -- CLIP-based scorers ---------------------------------------------------------------------------------------------
def clip_pixels(images: Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """[-1, 1] images -> CLIP's input: resized (bicubic, antialiased) to size x size, normalised; differentiable."""
    x = (images.float() + 1.0) / 2.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _preprocess_stats(folder: Path) -> tuple[tuple, tuple]:
    p = folder / "preprocessor_config.json"
    if p.exists():
        d = json.loads(p.read_text())
        return tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


class _ClipBased(RewardModel):
    """A scorer on a transformers CLIP model in the folder's `clip/` (frozen), with its preprocessing stats."""

    def load_clip(self, folder: Path, model_cls):
        self.folder = Path(folder)
        self.mean, self.std = _preprocess_stats(self.folder / "clip")
        return model_cls.from_pretrained(str(self.folder / "clip")).eval().requires_grad_(False)


class ClipReward(_ClipBased):
    """PickScore / HPS form: logit_scale x cos(CLIP image embedding, CLIP text embedding)."""

    kind = "clip"

    def __init__(self, folder: Path):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        self.model = self.load_clip(folder, CLIPModel)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.folder / "clip"))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        size = int(self.model.config.vision_config.image_size)
        pix = clip_pixels(images, size, self.mean, self.std).to(self.model.dtype)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(pix.device)
        m = self.model  # the towers and projections directly (get_*_features' return type changed across versions)
        img = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        txt = m.text_projection(m.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                                .pooler_output)
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)

    def save_pretrained(self, path: str | Path) -> None:
        out = Path(path)
        self.model.save_pretrained(str(out / "clip"))
        self.tokenizer.save_pretrained(str(out / "clip"))
        (out / CONFIG).write_text(json.dumps({"kind": self.kind}))


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (its state-dict keys)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(_ClipBased):
    """An aesthetic score of the image alone (prompts are ignored): the MLP on the unit CLIP image embedding."""

    kind = "aesthetic"

    def __init__(self, folder: Path):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        self.vision = self.load_clip(folder, CLIPVisionModelWithProjection)
        self.head = AestheticHead(int(self.vision.config.projection_dim)).eval().requires_grad_(False)
        self.head.load_state_dict(load_file(str(self.folder / "head.safetensors")))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        size = int(self.vision.config.image_size)
        pix = clip_pixels(images, size, self.mean, self.std).to(self.vision.dtype)
        emb = F.normalize(self.vision(pixel_values=pix).image_embeds.float(), dim=-1)
        return self.head(emb).squeeze(-1)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        self.vision.save_pretrained(str(out / "clip"))
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(out / "head.safetensors"))
        (out / CONFIG).write_text(json.dumps({"kind": self.kind}))


KINDS = {"agreement": AgreementReward, "clip": ClipReward, "aesthetic": AestheticReward}


def resolve_reward(name: str, key: str = "method.reward.model") -> Path:
    if name == TINY:
        from distill.models.loader import ASSETS

        return ASSETS / "tiny" / "reward"
    if name.startswith("distill:"):
        raise FileNotFoundError(f"{key}={name!r}: unknown built-in (known: {TINY})")
    return Path(name)


def load_reward(name: str, device: torch.device | str = "cpu", key: str = "method.reward.model") -> RewardModel:
    """A reward model folder (or `distill:tiny-reward`), frozen, in eval mode, on `device`."""
    folder = resolve_reward(str(name), key)
    if not (folder / CONFIG).exists():
        raise FileNotFoundError(f"{key}={str(name)!r}: not a reward model folder (needs {CONFIG} with a kind of "
                                f"{sorted(KINDS)}; see distill/models/reward.py)")
    cfg = json.loads((folder / CONFIG).read_text())
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{key}={str(name)!r}: {CONFIG} kind={kind!r}, expected one of {sorted(KINDS)}")
    model = AgreementReward.from_folder(folder, cfg) if kind == "agreement" else KINDS[kind](folder)
    return model.to(device).eval().requires_grad_(False)


# -- training the tiny world's agreement model -------------------------------------------------------------------
def train_agreement(steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 4321,
                    noise: float = 0.3, log_every: int = 250) -> AgreementReward:
    """Contrastive over all 24 prompts: each image's scores against every prompt, cross-entropy on its own caption,
    on fresh images of the "reward" split (never train / heldout / evaluator); half of each batch gets Gaussian
    noise up to `noise` (a student's imperfect samples should still be scored smoothly)."""
    from distill.data.synthetic import PROMPTS, caption, generate_batch
    from distill.evaluate import to_tensor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = sorted({w for p in PROMPTS for w in words(p)})
    model = AgreementReward(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for step in range(steps):
        imgs, attrs = generate_batch(range(step * batch_size, (step + 1) * batch_size), seed, "reward")
        x = to_tensor(imgs)
        sigma = torch.rand(batch_size, 1, 1, 1, generator=gen) * noise * (torch.rand(batch_size, 1, 1, 1,
                                                                                     generator=gen) < 0.5)
        x = x + sigma * torch.randn(x.shape, generator=gen)
        target = torch.tensor([PROMPTS.index(caption(a)) for a in attrs])
        logits = model.log_scale.exp() * model.embed_images(x) @ model.embed_prompts(PROMPTS).T
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            acc = (logits.argmax(1) == target).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.4f}  acc {acc:.3f}  {time.perf_counter() - start:.0f}s",
                  flush=True)
    model.info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "noise": noise,
                  "split": "reward", "train_seconds": round(time.perf_counter() - start, 1)}
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distill.models.reward", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the tiny world's agreement reward model")
    t.add_argument("--out", default=str(resolve_reward(TINY)))
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--seed", type=int, default=4321)
    args = p.parse_args(argv)
    model = train_agreement(steps=args.steps, seed=args.seed)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
