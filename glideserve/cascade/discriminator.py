"""The cascade's discriminator: how real a light model's image looks, as confidence = 1 - P(generated).

Two kinds, one interface (``confidence(images) -> [0, 1] per image``):

- ``SmallCNN``: a few strided convolutions trained from scratch on real images of the task
  against the light model's images (DiffServe trains an EfficientNet-V2-S the same way);
- ``EncoderHead``: an MLP head on a frozen image encoder loaded from a local folder (any
  ``transformers`` CLIP vision checkpoint), for real deployments (DiffServe's follow-up uses
  frozen CLIP ViT-B/32 + MLP).

Saved as ``discriminator.safetensors`` (trainable weights only) next to ``discriminator.json``
(kind, input size, encoder path, and the held-out report: accuracy, ROC-AUC, f(t)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS, CONFIG = "discriminator.safetensors", "discriminator.json"
KINDS = ("small-cnn", "encoder-head")


class SmallCNN(nn.Module):
    """Four stride-2 convolutions, global average pooling and a 2-way head [generated, real]."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).mean(dim=(2, 3)))


class EncoderHead(nn.Module):
    """An MLP head on a frozen ``CLIPVisionModelWithProjection`` read from a local folder."""

    def __init__(self, encoder_path: str | Path, hidden: int = 256):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        path = Path(encoder_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no image encoder at {path}: expected a transformers CLIP vision folder "
                                    "(config.json + model.safetensors)")
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(path, use_safetensors=True)
        self.encoder.requires_grad_(False).eval()
        self.image_size = int(self.encoder.config.image_size)
        self.head = nn.Sequential(nn.Linear(self.encoder.config.projection_dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 2))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, whatever the head does
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = nn.functional.interpolate(pixels, size=self.image_size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            embeds = self.encoder(pixel_values=pixels).image_embeds
        return self.head(embeds)


def to_tensor(images) -> torch.Tensor:
    """uint8 HWC images (arrays or PIL) as a float batch in [-1, 1], NCHW."""
    stack = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return torch.from_numpy(stack).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class Discriminator:
    """A trained network and how it was built; ``confidence`` is 1 - P(generated) per image."""

    network: nn.Module
    kind: str
    encoder_path: str | None = None
    report: dict = field(default_factory=dict)

    @torch.no_grad()
    def confidence(self, images) -> np.ndarray:
        self.network.eval()
        out = []
        for start in range(0, len(images), 256):
            logits = self.network(to_tensor(images[start:start + 256]))
            out.append(torch.softmax(logits, dim=-1)[:, 1])
        return torch.cat(out).numpy() if out else np.zeros(0)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.network.state_dict().items() if not k.startswith("encoder.")}

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(folder / WEIGHTS))
        config = {"kind": self.kind, "encoder_path": self.encoder_path, "report": self.report}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder


def build(kind: str, encoder_path: str | Path | None = None) -> Discriminator:
    if kind == "small-cnn":
        return Discriminator(SmallCNN(), kind)
    if kind == "encoder-head":
        if encoder_path is None:
            raise ValueError("an encoder-head discriminator needs --encoder PATH (a local CLIP vision folder)")
        return Discriminator(EncoderHead(encoder_path), kind, str(encoder_path))
    raise ValueError(f"unknown discriminator kind {kind!r}; choose one of {', '.join(KINDS)}")


def load(folder: str | Path) -> Discriminator:
    """A saved discriminator (safetensors only: weights never run code)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"no discriminator at {folder}: expected {CONFIG} and {WEIGHTS} "
                                "(train one with `glideserve cascade train-discriminator`)")
    config = json.loads((folder / CONFIG).read_text())
    disc = build(config["kind"], config.get("encoder_path"))
    missing, unexpected = disc.network.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise ValueError(f"{folder / WEIGHTS} does not match a {config['kind']} discriminator")
    disc.report = config.get("report", {})
    return disc


def roc_auc(scores_real: np.ndarray, scores_generated: np.ndarray) -> float:
    """P(a real image scores above a generated one), ties counting half (the ROC curve's area)."""
    from torchmetrics.functional.classification import binary_auroc

    preds = torch.from_numpy(np.concatenate([scores_real, scores_generated])).float()
    target = torch.cat([torch.ones(len(scores_real)), torch.zeros(len(scores_generated))]).long()
    return float(binary_auroc(preds, target))


def train(disc: Discriminator, real, generated, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
          seed: int = 0, progress: bool = False) -> None:
    """Cross-entropy on balanced batches of real (label 1) and generated (label 0) images, with flips."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([to_tensor(real), to_tensor(generated)])
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(generated))]).long()
    real_index = torch.arange(len(real))
    fake_index = torch.arange(len(real), len(x))
    params = [p for p in disc.network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    disc.network.train()
    half = max(1, batch_size // 2)
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="discriminator", unit="step")
    for _ in iterator:
        pick = torch.cat([real_index[torch.randint(len(real_index), (half,), generator=generator)],
                          fake_index[torch.randint(len(fake_index), (half,), generator=generator)]])
        batch = x[pick]
        flip = torch.rand(len(pick), generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        loss = nn.functional.cross_entropy(disc.network(batch), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    disc.network.eval()
