"""CLIP score and FID from weights on local disk (torchmetrics), for ``glideserve eval quality``.

Nothing is downloaded: a metric is computed only when its weights' path is given, and
a path that does not load fails before any image is generated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glideserve.errors import ModelLoadError

CLIP_SKIPPED = "skipped: pass --clip-model PATH (a local CLIP folder)"
FID_SKIPPED = "skipped: pass --fid-weights PATH (the FID Inception-v3 weights as a PyTorch state dict)"
FID_TOO_FEW = "skipped: FID needs at least 2 images"


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embedding tensor.

    transformers 5 returns a ModelOutput from these methods (embedding in
    ``pooler_output``), while torchmetrics' CLIPScore divides the return value by its norm.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(pixel_values, **kwargs))

    def get_text_features(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(input_ids, attention_mask, **kwargs))


def _embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _uint8_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


class ReferenceFreeMetrics:
    """CLIP score (text-image agreement) and FID (against the reference images) from local weights.

    A metric whose path is ``None`` is skipped and ``notes`` says how to enable it; a
    path that does not exist or does not load raises ModelLoadError at construction,
    before any image is generated.
    """

    def __init__(self, clip_model: Path | None = None, fid_weights: Path | None = None):
        self._clip = self._load_clip(clip_model) if clip_model is not None else None
        self._fid = self._load_fid(fid_weights) if fid_weights is not None else None
        self.notes = {name: note for name, note, metric in (("clip_score", CLIP_SKIPPED, self._clip),
                                                           ("fid", FID_SKIPPED, self._fid)) if metric is None}

    @staticmethod
    def _load_clip(path: Path):
        from torchmetrics.multimodal import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        if not path.is_dir():
            raise ModelLoadError(f"--clip-model {path} is not a folder; pass a local CLIP model folder "
                                 "(config.json, weights and the processor files)", "clip_model")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"could not load a CLIP model and processor from {path}: {exc}", "clip_model") from exc
        # A callable, because CLIPScore accepts only hub names as strings.
        return CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor))

    @staticmethod
    def _load_fid(path: Path):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if not path.is_file():
            raise ModelLoadError(f"--fid-weights {path} is not a file; pass the FID Inception-v3 weights "
                                 "(pt_inception-2015-12-05 as a PyTorch state dict)", "fid_weights")
        try:
            # Read safely first: the metric's own loader unpickles arbitrary objects.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a PyTorch state dict: {exc}", "fid_weights") from exc
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict", "fid_weights")
        try:
            return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path),
                                            reset_real_features=False)
        except ModuleNotFoundError as exc:
            raise ModelLoadError(f"FID needs the torch-fidelity package: pip install torch-fidelity ({exc})",
                                 "fid_weights") from exc
        except (RuntimeError, KeyError) as exc:
            # load_state_dict lists every missing key; the first line says enough.
            reason = str(exc).strip().splitlines()[0][:300]
            raise ModelLoadError(f"{path} is not the FID Inception-v3 state dict: {reason}", "fid_weights") from exc

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> float | None:
        if self._clip is None:
            return None
        self._clip.reset()
        with torch.inference_mode():
            self._clip.update(list(_uint8_batch(images)), prompts)
            return float(self._clip.compute())

    def set_reference(self, images: list[Image.Image]) -> None:
        if self._fid is not None and len(images) >= 2:
            with torch.inference_mode():
                self._fid.update(_uint8_batch(images), real=True)

    def fid(self, images: list[Image.Image]) -> float | None:
        if self._fid is None:
            return None
        if len(images) < 2:
            self.notes["fid"] = FID_TOO_FEW
            return None
        self._fid.reset()  # keeps the reference features (reset_real_features=False)
        with torch.inference_mode():
            self._fid.update(_uint8_batch(images), real=False)
            return float(self._fid.compute())
