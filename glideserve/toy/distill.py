"""``glide-turbo``: a few-step model distilled from ``glide-base`` by rectified-flow reflow.

Why reflow, not progressive or consistency distillation: the toy models are rectified
flows already, and one reflow round straightens their paths enough for one or two Euler
steps. It needs one pass of teacher sampling and one ordinary training run with the
same objective, sampler and scheduler convention as every other toy model. Progressive
distillation needs log2(steps) rounds. Consistency distillation needs a target network
and ODE-solver steps inside every training step. Both cost several times more CPU.

1. **Pairs.** For captions drawn with the task's difficulty mix, the teacher maps seeded
   noise ``z`` to a latent ``x0`` with its own pipeline: its default steps, with
   classifier-free guidance. So the student learns the guided trajectory.
2. **Reflow.** The student starts from the teacher's weights. It is trained on the
   straight line between each pair, ``x_t = (1 - sigma) x0 + sigma z``, with target
   ``z - x0``, with no caption dropout: guidance is baked in, and the student runs
   unguided (one row per image, not two).

It is served with ``guidance 1.0`` and 2 steps (``serving.json``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tqdm import tqdm

from glideserve.toy import recipe, scenes
from glideserve.toy.train import EmaTrainer, flow_sigmas

TURBO_STEPS = 2
TEACHER_GUIDANCE = 4.0


@torch.no_grad()
def teacher_pairs(teacher, count: int, seed: int, steps: int, batch: int = 64, progress: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``count`` (noise, teacher latent, caption) triples from the teacher pipeline."""
    specs = scenes.sample_specs(count, seed)
    captions = [s.caption for s in specs]
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (count, teacher.transformer.config.in_channels, recipe.latent_side(), recipe.latent_side())
    noise = torch.randn(shape, generator=generator)
    outs = []
    for start in tqdm(range(0, count, batch), desc="teacher pairs", disable=not progress, unit="batch"):
        chunk = captions[start:start + batch]
        outs.append(teacher(chunk, latents=noise[start:start + batch].clone(), num_inference_steps=steps,
                            guidance_scale=TEACHER_GUIDANCE, output_type="latent",
                            max_sequence_length=recipe.SCENES_T5_MAX_LENGTH).images)
    return noise, torch.cat(outs), captions


class ReflowTrainer(EmaTrainer):
    """The student (initialised from the teacher) on the fixed (noise, teacher latent) pairs."""

    def __init__(self, student, noise: torch.Tensor, latents: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor, caption_index: torch.Tensor, lr: float = 2e-4, batch_size: int = 64,
                 seed: int = 0):
        super().__init__(student, "glide-turbo reflow", lr, 0.0, seed)
        self.noise, self.latents, self.embeds, self.pooled = noise, latents, embeds, pooled
        self.caption_index = caption_index
        self.batch_size = batch_size

    def loss(self) -> torch.Tensor:
        batch = torch.randint(0, len(self.latents), (self.batch_size,), generator=self.generator)
        x0, z = self.latents[batch], self.noise[batch]
        sigma = flow_sigmas(torch.rand(len(batch), generator=self.generator))
        s = sigma.view(-1, 1, 1, 1)
        cond = self.caption_index[batch]
        pred = self.model(hidden_states=(1 - s) * x0 + s * z, encoder_hidden_states=self.embeds[cond],
                          pooled_projections=self.pooled[cond], timestep=sigma * 1000.0).sample
        return torch.nn.functional.mse_loss(pred, z - x0)


def distill_turbo(teacher_folder: Path, out: Path, *, steps: int | None, minutes: float | None, pairs: int,
                  seed: int = 0, resume: bool = False, checkpoint_every_s: float = 300.0,
                  progress: bool = True) -> Path:
    """Distill ``teacher_folder`` (a glide-base) into a ``TURBO_STEPS``-step model written to ``out``.

    The pairs are kept in ``out/reflow_pairs.pt`` and the trainer state in ``out/trainer_state.pt``,
    so ``resume`` continues an interrupted run without sampling the teacher again.
    """
    from diffusers import StableDiffusion3Pipeline

    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    out = Path(out)
    state_file, pairs_file = out / "trainer_state.pt", out / "reflow_pairs.pt"
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"nothing to resume: {state_file} does not exist; drop --resume to start fresh")
    out.mkdir(parents=True, exist_ok=True)
    teacher = StableDiffusion3Pipeline.from_pretrained(teacher_folder)
    teacher.set_progress_bar_config(disable=True)
    if pairs_file.is_file():
        saved = torch.load(pairs_file)
        noise, latents, captions = saved["noise"], saved["latents"], saved["captions"]
    else:
        noise, latents, captions = teacher_pairs(teacher, pairs, seed, recipe.DEFAULT_STEPS, progress=progress)
        torch.save({"noise": noise, "latents": latents, "captions": captions}, pairs_file)
    unique = list(dict.fromkeys(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    embeds, pooled = recipe.encode_captions(teacher, unique, recipe.SCENES_T5_MAX_LENGTH)
    trainer = ReflowTrainer(copy.deepcopy(teacher.transformer), noise, latents, embeds, pooled,
                            torch.tensor([lookup[c] for c in captions]), seed=seed)
    if resume:
        trainer.load_state_dict(torch.load(state_file, weights_only=False))
    p = recipe.preset("turbo")

    def checkpoint(t: ReflowTrainer) -> None:
        pipe = recipe.assemble_pipeline(t.ema, teacher.vae, {k: getattr(teacher, k) for k in (
            "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")})
        recipe.save_model(pipe, p, out)
        torch.save(t.state_dict(), state_file)

    trainer.run(steps=steps, minutes=minutes, progress=progress, checkpoint=checkpoint,
                checkpoint_every_s=checkpoint_every_s)
    return out
