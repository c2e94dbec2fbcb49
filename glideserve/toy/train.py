"""Train a toy model end to end: autoencoder, latent dataset, then the SD3 transformer.

The transformer is trained with the rectified-flow objective in the convention of
``FlowMatchEulerDiscreteScheduler``: ``x_t = (1 - sigma) * x_0 + sigma * noise``, the model
predicts ``noise - x_0`` and sees ``timestep = 1000 * sigma``; training sigmas follow the
same shifted distribution the sampler walks through. Captions are dropped to the empty
prompt 10% of the time so classifier-free guidance works, and an EMA of the weights is
what gets saved. Learning rate is constant after warm-up, so a run cut by ``minutes`` and a
run of the same number of ``steps`` are the same run.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from glideserve.toy import dataset, recipe

CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 200
SAMPLES_PER_CAPTION = 150
SCENE_SAMPLES = 40_000  # the compositional task has 10,416 captions: a fixed set of scenes, not per caption
# Transformer steps of the shipped models (what ``train-toy`` runs when given neither steps nor minutes).
DEFAULT_TRAIN_STEPS = {"small": 3576, "tiny": 5704}
DEFAULT_VAE_STEPS = 672
SCENES_VAE_STEPS = 400  # fine-tuning glide-small's autoencoder on the scenes


@dataclass
class LatentDataset:
    """Scaled VAE latents of a fixed image set with each image's caption index.

    ``embeds`` / ``pooled`` hold the text-encoder outputs of every caption, plus the empty
    prompt as the last row (the unconditional branch of classifier-free guidance).
    """

    latents: torch.Tensor  # (N, C, h, w), already shifted and scaled as the pipeline expects
    caption_index: torch.Tensor  # (N,) into embeds / pooled
    embeds: torch.Tensor  # (num_captions + 1, L, D)
    pooled: torch.Tensor  # (num_captions + 1, P)
    captions: list[str] = field(default_factory=list)  # the captions embeds rows 0..num_captions-1 encode

    @property
    def empty_index(self) -> int:
        return self.embeds.shape[0] - 1


@torch.no_grad()
def build_latent_dataset(pipe, seed: int, samples_per_caption: int = SAMPLES_PER_CAPTION,
                         progress: bool = True, task: str = "shapes", max_sequence_length: int = recipe.T5_MAX_LENGTH,
                         scene_samples: int = SCENE_SAMPLES) -> LatentDataset:
    """Render, encode and scale a fixed dataset; encode every caption it uses once with the pipeline's text
    side. ``shapes``: ``samples_per_caption`` images of each of the 168 captions; ``scenes``: ``scene_samples``
    scenes drawn with the task's default difficulty mix."""
    if task == "shapes":
        samples = dataset.random_samples(samples_per_caption * len(dataset.all_captions()), seed)
        render = dataset.render_batch
    else:
        from glideserve.toy import scenes

        samples = scenes.sample_scenes(scene_samples, seed)
        render = lambda chunk: np.stack([scenes.render_scene(s) for s in chunk])  # noqa: E731
    captions = list(dict.fromkeys(s.caption for s in samples))
    lookup = {text: i for i, text in enumerate(captions)}
    vae = pipe.vae
    chunks = []
    for start in tqdm(range(0, len(samples), 128), desc="latents", disable=not progress, unit="batch"):
        images = dataset.to_model_range(render(samples[start:start + 128]))
        chunks.append(vae.encode(images).latent_dist.mean)
    latents = (torch.cat(chunks) - vae.config.shift_factor) * vae.config.scaling_factor
    embeds, pooled = recipe.encode_captions(pipe, captions + [""], max_sequence_length)
    index = torch.tensor([lookup[s.caption] for s in samples])
    return LatentDataset(latents, index, embeds, pooled, captions)


def flow_sigmas(u: torch.Tensor, shift: float = recipe.SCHEDULER_SHIFT) -> torch.Tensor:
    """Map uniform ``u`` to the scheduler's shifted sigmas (the same map its timesteps use)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def draw_batch(data: LatentDataset, batch_size: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of a random batch and their caption rows, ``CAPTION_DROPOUT`` of them the empty prompt."""
    batch = torch.randint(0, len(data.latents), (batch_size,), generator=generator)
    cond = data.caption_index[batch].clone()
    cond[torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT] = data.empty_index
    return data.latents[batch], cond


def flow_loss(transformer, x0: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss of ``x0`` conditioned on ``embeds`` / ``pooled``, at sigmas the sampler visits."""
    sigma = flow_sigmas(torch.rand(len(x0), generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    pred = transformer(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=sigma * 1000.0).sample
    return torch.nn.functional.mse_loss(pred, noise - x0)


class EmaTrainer:
    """A model, its EMA copy (what gets saved), AdamW, a seeded generator and a step count; checkpointable.

    Subclasses give ``loss()`` for one batch they draw with ``generator``. ``train_step`` warms the
    learning rate up over ``WARMUP_STEPS`` (then keeps it constant, so a run cut by minutes and a run of
    the same steps are the same run), clips gradients at 1 and updates the EMA.
    """

    def __init__(self, model: torch.nn.Module, name: str, lr: float, weight_decay: float, seed: int = 0,
                 param_groups: list[dict] | None = None):
        self.name = name
        self.model = model.train().requires_grad_(True)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        groups = param_groups or [{"params": list(self.model.parameters()), "lr": lr}]
        for group in groups:
            group["base_lr"] = group.get("lr", lr)
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self) -> float:
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, (self.step + 1) / WARMUP_STEPS)
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        decay = min(EMA_DECAY, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for ema_param, param in zip(self.ema.parameters(), self.model.parameters()):
                ema_param.lerp_(param, 1.0 - decay)
        self.step += 1
        return loss.item()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]

    def run(self, *, steps: int | None, minutes: float | None, progress: bool = True,
            checkpoint: Callable[["EmaTrainer"], None] | None = None,
            checkpoint_every_s: float = 300.0) -> None:
        """Train until ``steps`` total steps or for ``minutes`` more minutes (exactly one is given)."""
        if (steps is None) == (minutes is None):
            raise ValueError("give exactly one of steps or minutes")
        deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        bar = tqdm(total=steps, initial=self.step, desc=self.name, disable=not progress, unit="step")
        last_checkpoint = time.monotonic()
        running = None
        while (steps is not None and self.step < steps) or (deadline is not None and time.monotonic() < deadline):
            loss = self.train_step()
            running = loss if running is None else 0.98 * running + 0.02 * loss
            bar.update(1)
            if self.step % 25 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
            if checkpoint is not None and time.monotonic() - last_checkpoint > checkpoint_every_s:
                checkpoint(self)
                last_checkpoint = time.monotonic()
        bar.close()
        if checkpoint is not None:
            checkpoint(self)


class TransformerTrainer(EmaTrainer):
    """A toy model's transformer trained from scratch on a latent dataset (``flow_loss``)."""

    def __init__(self, p: recipe.ToyPreset, data: LatentDataset, seed: int = 0, transformer=None):
        super().__init__(transformer if transformer is not None else recipe.build_transformer(p, seed),
                         f"{p.name} transformer", p.lr, 0.01, seed)
        self.preset = p
        self.data = data

    def loss(self) -> torch.Tensor:
        x0, cond = draw_batch(self.data, self.preset.batch_size, self.generator)
        return flow_loss(self.model, x0, self.data.embeds[cond], self.data.pooled[cond], self.generator)

    def pipeline(self, vae, text: dict):
        """The EMA weights as a pipeline (what a checkpoint saves)."""
        return recipe.assemble_pipeline(self.ema, vae, text)


class JointTextTrainer(EmaTrainer):
    """The transformer and the three text encoders trained together (``ToyPreset.text_lr_scale`` > 0).

    Frozen random encoders hand the transformer an unordered bag of nearly untouched word
    vectors (SD3 gives text tokens no positions of its own), so which colour goes with which
    shape, and which object comes first, is barely in them. Trained, T5's relative-position
    attention can write each adjective into its noun. Prompts are encoded every step with the
    pipeline's own ``encode_prompt`` (gradients on), so training and serving read captions alike.
    The encoders run in eval mode (no dropout) while their weights learn, at ``text_lr_scale``
    times the transformer's learning rate.
    """

    def __init__(self, p: recipe.ToyPreset, data: LatentDataset, transformer, vae, text: dict, seed: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        modules = {"transformer": transformer, **{k: text[k] for k in recipe.TEXT_ENCODERS}}
        model = torch.nn.ModuleDict(modules)
        groups = [{"params": list(transformer.parameters()), "lr": p.lr},
                  {"params": [q for k in recipe.TEXT_ENCODERS for q in modules[k].parameters()],
                   "lr": p.lr * p.text_lr_scale}]
        super().__init__(model, f"{p.name} transformer + text encoders", p.lr, 0.01, seed, param_groups=groups)
        for key in recipe.TEXT_ENCODERS:
            self.model[key].eval()
        self.preset = p
        self.data = data
        self.tokenizers = {k: text[k] for k in recipe.TOKENIZERS}
        # Only encode_prompt is used: it reads the live encoders and tokenizers through the pipeline.
        self.text_pipe = StableDiffusion3Pipeline(
            transformer=self.model["transformer"], vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
            **{k: self.model[k] for k in recipe.TEXT_ENCODERS}, **self.tokenizers)

    def loss(self) -> torch.Tensor:
        x0, cond = draw_batch(self.data, self.preset.batch_size, self.generator)
        captions = [self.data.captions[i] if i < len(self.data.captions) else "" for i in cond.tolist()]
        embeds, pooled = recipe.encode_captions(self.text_pipe, captions, self.preset.t5_max_length, grad=True)
        return flow_loss(self.model["transformer"], x0, embeds, pooled, self.generator)

    def pipeline(self, vae, text: dict):
        trained = {k: self.ema[k] for k in recipe.TEXT_ENCODERS}
        return recipe.assemble_pipeline(self.ema["transformer"], vae, {**text, **trained})


def load_vae_from(folder: Path):
    from diffusers import AutoencoderKL

    folder = Path(folder)
    sub = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"no AutoencoderKL in {folder}: pass a model folder (with vae/) or a VAE folder")
    return AutoencoderKL.from_pretrained(sub).eval()


def train_toy_model(size: str, out: Path, *, steps: int | None = None, minutes: float | None = None,
                    seed: int = 0, vae_from: Path | None = None, vae_steps: int = DEFAULT_VAE_STEPS,
                    samples_per_caption: int = SAMPLES_PER_CAPTION, resume: bool = False,
                    checkpoint_every_s: float = 300.0, progress: bool = True,
                    latent_cache: Path | None = None, scene_samples: int = SCENE_SAMPLES,
                    init_from: Path | None = None) -> Path:
    """Train one bundled-size model and write it to ``out`` in the diffusers SD3 layout.

    The VAE is trained first (``vae_steps``) unless ``vae_from`` names a folder with a trained
    one. Every checkpoint rewrites the model folder from the EMA weights, so an interrupted
    run still leaves a loadable model, and ``resume`` continues from ``out/trainer_state.pt``.
    ``latent_cache`` (a file) keeps the encoded image set between runs that share a VAE and seed.
    ``init_from`` (a model folder of this size) continues training from its saved weights and VAE
    with a fresh optimizer: what a run interrupted without its ``trainer_state.pt`` can restart from.
    """
    from glideserve.toy import vae as toy_vae

    p = recipe.preset(size)
    out = Path(out)
    state_file = out / "trainer_state.pt"
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"nothing to resume: {state_file} does not exist; drop --resume to start fresh")
    out.mkdir(parents=True, exist_ok=True)
    if init_from is not None and vae_from is None:
        vae_from = init_from
    if vae_from is not None:
        vae = load_vae_from(Path(vae_from))
    elif resume:
        vae = load_vae_from(out)
    elif p.task == "scenes":  # small objects need more than the one-shape autoencoder: fine-tune it on scenes
        from glideserve.models.loading import bundled_model_dir

        vae = toy_vae.train_vae(steps=vae_steps, minutes=None, seed=seed, progress=progress, task="scenes",
                                init=load_vae_from(bundled_model_dir("glide-small")))
    else:
        vae = toy_vae.train_vae(steps=vae_steps, minutes=None, seed=seed, progress=progress)
    text = recipe.build_text_components(p.task)
    transformer = recipe.build_transformer(p, seed)
    if init_from is not None:
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(Path(init_from), subfolder="transformer")
        text = {**text, **recipe.load_text_encoders(Path(init_from))}
    pipe = recipe.assemble_pipeline(transformer, vae, text)
    if latent_cache is not None and Path(latent_cache).is_file():
        cached = torch.load(latent_cache)
        embeds, pooled = recipe.encode_captions(pipe, cached["captions"] + [""], p.t5_max_length)
        data = LatentDataset(cached["latents"], cached["caption_index"], embeds, pooled, cached["captions"])
    else:
        data = build_latent_dataset(pipe, seed, samples_per_caption, progress, task=p.task,
                                    max_sequence_length=p.t5_max_length, scene_samples=scene_samples)
        if latent_cache is not None:
            torch.save({"latents": data.latents, "caption_index": data.caption_index,
                        "captions": data.captions}, latent_cache)
    if p.text_lr_scale > 0:
        trainer: EmaTrainer = JointTextTrainer(p, data, transformer, vae, text, seed)
    else:
        trainer = TransformerTrainer(p, data, seed, transformer)
    if resume:
        trainer.load_state_dict(torch.load(state_file, weights_only=False))

    def checkpoint(t) -> None:
        recipe.save_model(t.pipeline(vae, text), p, out)
        torch.save(t.state_dict(), state_file)

    trainer.run(steps=steps, minutes=minutes, progress=progress, checkpoint=checkpoint,
                checkpoint_every_s=checkpoint_every_s)
    return out
