"""A toy CLIP for the toy task: an image encoder and a text encoder trained contrastively.

Real CLIP score and FID need downloaded weights; these two small encoders give the same
kinds of measurement offline, on the task's own images and captions:

- **toy CLIP score**: ``100 x cos(image embedding, caption embedding)``, averaged over images
  (as torchmetrics' CLIPScore, clipped at 0);
- **toy FID**: the Fréchet distance between the image encoder's features of generated
  images and of dataset images drawn for the same captions (torchmetrics'
  ``FrechetInceptionDistance`` with this encoder as its feature extractor).

Training (``glideserve train-toy-clip``) draws fresh scenes of every difficulty each step
and uses the symmetric InfoNCE loss of CLIP. A caption alone is an easy negative for most
images of a batch; to make the score see positions and bindings, each relation caption also
brings a hard negative into the text side: the same words with the relation reversed or
the colours swapped. The text encoder reads whole words (the task's vocabulary), so it
needs no tokenizer files.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glideserve.toy import scenes

EMBED_DIM = 128
FEATURE_DIM = 256
MAX_WORDS = 16
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


def vocabulary() -> list[str]:
    words = {"<pad>", "<unk>"}
    for level in scenes.DIFFICULTIES:
        for caption in scenes.captions_of(level):
            words.update(caption.split())
    return sorted(words)


class ImageEncoder(nn.Module):
    """A small CNN: 64x64 RGB in [0, 1] -> ``FEATURE_DIM`` features -> ``EMBED_DIM`` embedding.

    ``num_features`` and ``forward`` returning features make it a torchmetrics FID feature extractor.
    """

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128, FEATURE_DIM):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*layers)  # 64 -> 4 spatial
        self.project = nn.Linear(FEATURE_DIM, EMBED_DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of ``(N, 3, H, W)`` images in [0, 1] (what FID compares)."""
        x = self.body(images * 2.0 - 1.0)
        # Keep coarse layout in the features: positions and counts matter to the task.
        return x.flatten(2).mean(-1) + x.amax(dim=(2, 3))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.project(self.forward(images)), dim=-1)


class TextEncoder(nn.Module):
    """Whole-word embeddings, positions, two transformer layers, mean pooling -> ``EMBED_DIM``."""

    def __init__(self, words: list[str], width: int = 96):
        super().__init__()
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.tokens = nn.Embedding(len(words), width)
        self.positions = nn.Parameter(torch.zeros(MAX_WORDS, width))
        layer = nn.TransformerEncoderLayer(width, 4, width * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.project = nn.Linear(width, EMBED_DIM)

    def ids(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pad, unk = self.index["<pad>"], self.index["<unk>"]
        rows = [[self.index.get(w, unk) for w in c.split()][:MAX_WORDS] for c in captions]
        ids = torch.full((len(rows), MAX_WORDS), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return ids, ids == pad

    def embed(self, captions: list[str]) -> torch.Tensor:
        ids, padding = self.ids(captions)
        x = self.body(self.tokens(ids) + self.positions, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        pooled = (x * keep).sum(1) / keep.sum(1)
        return nn.functional.normalize(self.project(pooled), dim=-1)


def hard_negative(spec: scenes.CaptionSpec) -> str | None:
    """A caption of the same words that means something else (relation reversed, or colours swapped)."""
    if spec.kind != "relation":
        return None
    if spec.color != spec.color2:
        swapped = scenes.CaptionSpec("relation", spec.background, spec.color2, spec.shape, relation=spec.relation,
                                     color2=spec.color, shape2=spec.shape2)
        if zlib.crc32(spec.caption.encode()) % 2:  # either kind, deterministically per caption
            return swapped.caption
    return scenes.CaptionSpec("relation", spec.background, spec.color, spec.shape, relation=OPPOSITE[spec.relation],
                              color2=spec.color2, shape2=spec.shape2).caption


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


class ToyClip(nn.Module):
    """Both encoders and the learned temperature."""

    def __init__(self, words: list[str] | None = None):
        super().__init__()
        self.image = ImageEncoder()
        self.text = TextEncoder(words or vocabulary())
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    @torch.no_grad()
    def score(self, images: np.ndarray, captions: list[str]) -> torch.Tensor:
        """Per image: 100 x cosine with its caption, clipped at 0 (CLIPScore's convention)."""
        self.eval()
        cos = (self.image.embed(to_unit_range(images)) * self.text.embed(captions)).sum(-1)
        return (100.0 * cos).clamp(min=0)

    def loss(self, images: torch.Tensor, captions: list[str], negatives: list[str]) -> torch.Tensor:
        image_emb = self.image.embed(images)
        text_emb = self.text.embed(captions + negatives)
        logits = self.log_scale.exp().clamp(max=100) * image_emb @ text_emb.T
        target = torch.arange(len(captions))
        return (nn.functional.cross_entropy(logits, target)
                + nn.functional.cross_entropy(logits[:, :len(captions)].T, target)) / 2


def train_toy_clip(*, steps: int | None, minutes: float | None = None, batch_size: int = 128, lr: float = 2e-3,
                   seed: int = 0, progress: bool = True) -> ToyClip:
    """Train both encoders on freshly drawn scenes (every difficulty, the task's default mix)."""
    from tqdm import tqdm

    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    torch.manual_seed(seed)
    model = ToyClip()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    bar = tqdm(total=steps, desc="toy clip", disable=not progress, unit="step")
    step = 0
    while (steps is not None and step < steps) or (deadline is not None and time.monotonic() < deadline):
        batch = scenes.sample_scenes(batch_size, seed * 1_000_003 + step, mix={"easy": 0.2, "medium": 0.3,
                                                                             "hard": 0.5})
        images = to_unit_range(np.stack([scenes.render_scene(s) for s in batch]))
        captions = [s.caption for s in batch]
        negatives = [n for n in (hard_negative(s.spec) for s in batch) if n is not None and n not in captions]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        loss = model.loss(images, captions, negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def retrieval_accuracy(model: ToyClip, per_level: int = 200, seed: int = 99) -> dict[str, float]:
    """Per difficulty: how often a held-out dataset image ranks its own caption first among every
    caption of the sample plus each relation caption's hard negative."""
    model.eval()
    out = {}
    for level, captions in scenes.evaluation_captions(per_level, seed).items():
        images = to_unit_range(reference_images(captions, seed))
        candidates = list(dict.fromkeys(captions + [n for n in (hard_negative(scenes.parse_caption(c))
                                                                 for c in captions) if n]))
        sims = model.image.embed(images) @ model.text.embed(candidates).T
        best = sims.argmax(-1)
        out[level] = float(np.mean([candidates[int(b)] == c for b, c in zip(best, captions)]))
    return out


def save_toy_clip(model: ToyClip, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "toy_clip.safetensors")
    (out / "config.json").write_text(json.dumps({"words": model.text.words, "embed_dim": EMBED_DIM,
                                                 "feature_dim": FEATURE_DIM}, indent=1) + "\n")


def load_toy_clip(folder: str | Path | None = None) -> ToyClip:
    """The shipped encoders (``glideserve/data/toy_clip``) or those in ``folder`` (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else bundled_toy_clip_dir()
    config = json.loads((folder / "config.json").read_text())
    model = ToyClip(config["words"])
    model.load_state_dict(load_file(folder / "toy_clip.safetensors"))
    return model.eval()


def bundled_toy_clip_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("glideserve").joinpath("data/toy_clip")))


def toy_fid(model: ToyClip, generated: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance of the image encoder's features (torchmetrics' FID with this encoder)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=model.image, normalize=True)
    with torch.no_grad():
        for batch, real in ((reference, True), (generated, False)):
            for start in range(0, len(batch), 256):
                fid.update(to_unit_range(batch[start:start + 256]), real=real)
    return float(fid.compute())


def reference_images(captions: list[str], seed: int) -> np.ndarray:
    """Dataset images of the same captions (fresh draws), the reference side of the toy FID."""
    rng = np.random.default_rng(seed)
    return np.stack([scenes.render_scene(scenes.draw_scene(scenes.parse_caption(c), rng)) for c in captions])


