"""Train the toy models' autoencoder: a small ``AutoencoderKL`` fitted to the shape images.

Flat-coloured shapes are easy to compress, so a few thousand steps of MSE with a small
KL term make decoding faithful. The latent statistics of the trained encoder set the
``shift_factor`` / ``scaling_factor`` the SD3 pipeline applies, so the denoiser sees
latents of roughly zero mean and unit variance.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from glideserve.toy import dataset

VAE_CHANNELS = (16, 32, 64)  # three levels: latent factor 4 (64x64 image -> 16x16 latent)
LATENT_CHANNELS = 4
KL_WEIGHT = 1e-5


def build_vae(seed: int = 0):
    """An untrained ``AutoencoderKL`` in the toy models' layout."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        layers_per_block=1, norm_num_groups=8, sample_size=dataset.IMAGE_SIZE,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def task_images(task: str, count: int, seed: int) -> torch.Tensor:
    """``count`` fresh images of ``task`` (``shapes``: one centred shape; ``scenes``: the compositional
    task's mix) in the VAE's input range."""
    if task == "shapes":
        return dataset.to_model_range(dataset.render_batch(dataset.random_samples(count, seed)))
    if task == "scenes":
        from glideserve.toy import scenes

        return dataset.to_model_range(np.stack([scenes.render_scene(s) for s in scenes.sample_scenes(count, seed)]))
    raise ValueError(f"unknown toy task {task!r}; choose shapes or scenes")


def train_vae(*, steps: int | None, minutes: float | None, batch_size: int = 24, lr: float = 1e-3,
              seed: int = 0, log_every: int = 50, progress: bool = True, task: str = "shapes", init=None):
    """Train a fresh VAE for ``steps`` optimizer steps or ``minutes`` of wall time (whichever is set).

    Every batch is freshly drawn from the procedural dataset (seeded), so there is no
    overfitting to a fixed set. The learning rate is constant, so a run cut by ``minutes``
    equals a run of the same number of ``steps``. ``init`` (a trained VAE of the same layout) is
    fine-tuned instead of a fresh one. Returns the trained VAE in eval mode with its scaling
    factors set.
    """
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    vae = build_vae(seed)
    if init is not None:
        vae.load_state_dict(init.state_dict())
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
    total = steps
    bar = tqdm(total=total, desc="vae", disable=not progress, unit="step")
    step = 0
    while (steps is not None and step < steps) or (deadline is not None and time.monotonic() < deadline):
        images = task_images(task, batch_size, seed * 1_000_003 + step)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, images)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % log_every == 0:
            bar.set_postfix(mse=f"{mse.item():.5f}", kl=f"{kl.item():.1f}")
    bar.close()
    vae.eval()
    set_latent_scaling(vae, seed, task=task)
    return vae


@torch.no_grad()
def set_latent_scaling(vae, seed: int = 0, count: int = 512, task: str = "shapes") -> None:
    """Set ``shift_factor`` and ``scaling_factor`` from the encoder's latent statistics."""
    images = task_images(task, count, seed + 7)
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


@torch.no_grad()
def reconstruction_error(vae, count: int = 64, seed: int = 12345) -> float:
    """Mean absolute pixel error (0..255 scale) of encode->decode on fresh dataset images."""
    images = dataset.to_model_range(dataset.render_batch(dataset.random_samples(count, seed)))
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    return float((recon - images).abs().mean() * 127.5)
