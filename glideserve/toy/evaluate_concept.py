"""Judge a fine-tuned concept: the new colour and the old captions, each with and without the adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glideserve.params import GenerationParams
from glideserve.toy import dataset
from glideserve.toy.concept import evaluation_triples
from glideserve.toy.judge import FIELDS, accuracy, judge_image


def evaluate_concept(model: str, lora_dir: Path, lora: str, color: str, seeds: int,
                     old_per_color: int = 1) -> dict:
    """One engine, one batch per (captions, adapter) cell; every image judged against the palette that
    includes the new colours, so an old-colour answer to a new-colour caption counts as wrong."""
    from glideserve.engine.engine import Engine

    engine = Engine.from_pretrained(model, lora_dir=str(lora_dir), profile=False, default_cache="none")
    rows = []
    for group, triples in evaluation_triples(color, old_per_color).items():
        cases = [(triple, seed) for triple in triples for seed in range(seeds)]
        for adapter in (None, lora):
            params = [GenerationParams(prompt=dataset.caption(*triple), seed=1000 + seed,
                                       lora=adapter or ()) for triple, seed in cases]
            results = engine.generate(params)
            verdicts = [judge_image(np.asarray(r.image.convert("RGB")), dataset.ALL_COLORS) for r in results]
            scores = accuracy(verdicts, [triple for triple, _ in cases])
            rows.append({"captions": group, "adapter": adapter or "none", "images": len(cases),
                         **{k: round(scores[k], 4) for k in ("all", *FIELDS)}})
    return {"model": model, "lora": lora, "color": color, "seeds": seeds, "rows": rows}
