"""GlideServe's latent-aware denoising for flow-matching samplers.

Per request and per step, from the request's own latents: ``std`` over (C, H, W) and
``edge``, the mean gradient magnitude ``sqrt(dx^2 + dy^2)``; when ``0.7 < edge < 0.9``
the latents get ``0.01 * randn`` (from the request's own generator, so a seed means
the same image on every run); ``a = sigmoid((std + 0.3 edge)(1 + 0.3 sigmoid(2 edge)))``
and ``sigma_adapt = sigma (0.7 + 0.3 a)``. The model stays conditioned on the true
sigma, but the clean estimate becomes ``D = x - sigma_adapt v``, so a step removes
less noise where the factor is below 1.

The seed feeds ``D`` to a solver in data-prediction form; its first-order step is
``x' = (sigma_next / sigma) x + (1 - sigma_next / sigma) D = x + (sigma_next - sigma)
(sigma_adapt / sigma) v``: Euler's flow step with the velocity scaled by the factor.
That is what this module hands to the request's own sampler.
"""

from __future__ import annotations

import torch


def adapt_factor(latents: torch.Tensor) -> torch.Tensor:
    """``0.7 + 0.3 a`` for one request's latents ``(1, C, H, W)``, and its edge strength."""
    std = latents.std()
    dx = latents[..., :, 1:] - latents[..., :, :-1]
    dy = latents[..., 1:, :] - latents[..., :-1, :]
    edge = torch.sqrt(dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2).mean()
    a = torch.sigmoid((std + 0.3 * edge) * (1 + 0.3 * torch.sigmoid(2 * edge)))
    return 0.7 + 0.3 * a, edge


def latent_aware_step(latents: torch.Tensor, velocity: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents, velocity)`` to hand to the flow sampler's step instead of the originals."""
    factor, edge = adapt_factor(latents)
    if 0.7 < float(edge) < 0.9:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        latents = latents + 0.01 * noise
    return latents, velocity * factor.to(velocity)
