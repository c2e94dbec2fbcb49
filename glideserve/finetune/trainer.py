"""LoRA training on a served model: peft adapters on a clone of the denoiser that shares its weights.

The clone is a second module tree over the *same* parameter tensors as the serving denoiser (no copy of
the weights); peft's LoRA layers are added to the clone only, so serving rows never see the training
adapter. Loss is the model's own: flow matching for SD3 (noisy = (1 - sigma) x0 + sigma noise, target
noise - x0, sigmas and timesteps from the model's FlowMatchEulerDiscreteScheduler), epsilon or v
prediction for UNets (DDPM noising with the model's scheduler config). Every random draw comes from one
seeded generator, so a job paused, checkpointed and resumed ends with the same weights as one run
straight through. Runs outside ``torch.inference_mode`` (the runner's tensors cannot be saved for backward):
prompts and latents are encoded here, once, under ``no_grad``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from glideserve.errors import InvalidRequestError
from glideserve.finetune.dataset import Pair, check_name
from glideserve.runner.lora import RowLoRALinear
from glideserve.runner.lora_files import TARGETABLE_SUFFIXES

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MAX_STEPS = 100_000


@dataclass(frozen=True)
class FineTuneConfig:
    """One job's settings, validated: the served ``model``, the dataset, the adapter to produce, LoRA rank
    and targets, optimisation (steps, batch size, learning rate, seed) and checkpoint period."""

    model: str
    dataset: str
    adapter_name: str
    rank: int = 8
    alpha: float | None = None  # default: rank (a scaling of 1)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 200
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        check_name(self.adapter_name, "the adapter name (suffix)", "suffix")
        checks = [(1 <= self.rank <= 128, "lora_rank must be in 1..128", "lora_rank"),
                  (1 <= self.steps <= MAX_STEPS, f"n_steps must be in 1..{MAX_STEPS}", "n_steps"),
                  (1 <= self.batch_size <= 64, "batch_size must be in 1..64", "batch_size"),
                  (0 < self.learning_rate <= 1.0, "learning_rate must be in (0, 1]", "learning_rate"),
                  (1 <= self.checkpoint_every <= MAX_STEPS, "checkpoint_every must be >= 1", "checkpoint_every"),
                  (self.alpha is None or 0 < self.alpha <= 1024, "lora_alpha must be in (0, 1024]", "lora_alpha"),
                  (0 <= self.seed < 2**63, "seed must be a non-negative integer", "seed")]
        for ok, message, param in checks:
            if not ok:
                raise InvalidRequestError(message, param)
        if not self.target_modules or any(t not in TARGETABLE_SUFFIXES for t in self.target_modules):
            raise InvalidRequestError(f"target_modules must be some of {', '.join(TARGETABLE_SUFFIXES)}",
                                      "target_modules")

    def as_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


def shared_clone(denoiser: nn.Module) -> nn.Module:
    """A module tree over the same parameters and buffers (not copied), with per-row LoRA wrappers
    replaced by their base layers so peft sees plain ``nn.Linear`` targets."""
    memo = {id(t): t for t in (*denoiser.parameters(), *denoiser.buffers())}
    clone = copy.deepcopy(denoiser, memo)
    for name, module in list(clone.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RowLoRALinear):
                setattr(module, child_name, child.base)
    return clone


@dataclass
class TrainState:
    """What a checkpoint holds besides tensors: progress and the loss history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


class LoRATrainer:
    """Trains one LoRA on ``family``'s denoiser (see the module docstring); ``step()`` is one micro-step
    (one optimizer step on ``batch_size`` samples). ``family`` is the engine's model family adapter
    (its ``pipe``, ``encode`` and ``denoiser_prefix``)."""

    def __init__(self, family, config: FineTuneConfig, pairs: list[Pair]):
        from peft import LoraConfig

        if family.name not in ("sd3", "sd15"):
            raise InvalidRequestError(f"fine-tuning serves SD3 and SD1.5 models; {family.name} is not supported "
                                      "yet", "model")
        self.family = family
        self.config = config
        self.device = family.device
        self.pipe = family.pipe
        base = family.denoiser_of(self.pipe)
        for parameter in base.parameters():  # shared with serving, which runs under inference_mode anyway
            parameter.requires_grad_(False)
        self.denoiser = shared_clone(base)
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: seed it
            torch.manual_seed(config.seed)
            self.denoiser.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank,
                                                 target_modules=list(config.target_modules), init_lora_weights=True),
                                      adapter_name=config.adapter_name)
        self.denoiser.train()
        self.lora = [(name, p) for name, p in self.denoiser.named_parameters() if "lora_" in name]
        for _, parameter in self.lora:
            parameter.requires_grad_(True)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW([p for _, p in self.lora], lr=config.learning_rate, weight_decay=0.0)
        self.state = TrainState()
        self.latents, self.conds = self._encode(pairs)
        self._noise_scheduler()

    # -- data ------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, pairs: list[Pair]):
        spec = self.family.spec
        vae = self.pipe.vae
        latents = []
        for pair in pairs:
            with Image.open(pair.image) as image:
                image = image.convert("RGB").resize((spec.default_width, spec.default_height), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
            dist = vae.encode(pixels[None].to(self.device, vae.dtype)).latent_dist
            latent = dist.mean  # the mode: deterministic latents, so restarts see the same data
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents.append(((latent - shift) * vae.config.scaling_factor).float().cpu())
        conds = self.family.encode([pair.caption for pair in pairs])
        conds = [{k: v.detach().clone() for k, v in cond.items()} for cond in conds]
        return torch.cat(latents), conds

    def _noise_scheduler(self) -> None:
        config = self.pipe.scheduler.config
        if self.family.name == "sd3":
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            self.timesteps, self.sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
        else:
            from diffusers import DDPMScheduler

            self.ddpm = DDPMScheduler.from_config(config)

    # -- one micro-step --------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step; returns its loss."""
        g = self.generator
        index = torch.randint(0, len(self.latents), (self.config.batch_size,), generator=g)
        x0 = self.latents[index].to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        cond = {k: torch.cat([self.conds[int(i)][k] for i in index]).to(self.device) for k in self.conds[0]}
        if self.family.name == "sd3":
            pick = torch.randint(0, len(self.timesteps), (len(index),), generator=g)
            sigma = self.sigmas[pick].view(-1, 1, 1, 1).to(self.device)
            noisy = (1.0 - sigma) * x0 + sigma * noise
            prediction = self.denoiser(hidden_states=noisy, timestep=self.timesteps[pick].to(self.device),
                                       encoder_hidden_states=cond["encoder_hidden_states"],
                                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]
            target = noise - x0
        else:
            t = torch.randint(0, self.ddpm.config.num_train_timesteps, (len(index),), generator=g)
            noisy = self.ddpm.add_noise(x0, noise, t)
            prediction = self.denoiser(noisy, t.to(self.device), encoder_hidden_states=cond["encoder_hidden_states"],
                                       return_dict=False)[0]
            kind = self.ddpm.config.prediction_type
            target = noise if kind == "epsilon" else self.ddpm.get_velocity(x0, noise, t)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        value = loss.item()
        self.state.step += 1
        self.state.losses.append(value)
        return value

    @property
    def done(self) -> bool:
        return self.state.step >= self.config.steps

    @property
    def memory_bytes(self) -> int:
        """Adapter weights, their gradients and AdamW's two moments."""
        return 4 * sum(p.numel() * p.element_size() for _, p in self.lora)

    # -- checkpoints and the result ----------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        """Adapter weights, optimizer moments, step, losses and the generator's state, as safetensors + JSON
        (no pickle), written atomically."""
        from safetensors.torch import save_file

        tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in self.lora}
        for i, (name, p) in enumerate(self.lora):
            moments = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in moments:
                    tensors[f"{key}.{name}"] = torch.as_tensor(moments[key]).detach().cpu().contiguous()
        tensors["rng"] = self.generator.get_state()
        metadata = {"state": json.dumps(asdict(self.state)), "config": json.dumps(self.config.as_dict())}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    def load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        saved = json.loads(metadata.get("config", "{}"))
        if saved and saved != self.config.as_dict():
            raise ValueError(f"checkpoint {path} belongs to another job configuration")
        with torch.no_grad():
            for name, p in self.lora:
                p.copy_(tensors[f"param.{name}"])
                moments = {key: tensors[f"{key}.{name}"].to(p.device) for key in ("exp_avg", "exp_avg_sq", "step")
                           if f"{key}.{name}" in tensors}
                if moments:
                    self.optimizer.state[p] = moments
        self.generator.set_state(tensors["rng"])
        self.state = TrainState(**json.loads(metadata["state"]))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trained adapter under diffusers/peft keys (``transformer.<module>.lora_A.weight``)."""
        prefix, name_ = self.family.denoiser_prefix, self.config.adapter_name
        out = {}
        for name, p in self.lora:
            for which in ("lora_A", "lora_B"):
                name = name.replace(f".{which}.{name_}.weight", f".{which}.weight")
            out[f"{prefix}.{name}"] = p.detach().cpu().contiguous()
        return out

    def export(self, path: Path) -> None:
        """Write the adapter as a LoRA file the server's LoRA store reads (alpha in diffusers' metadata)."""
        from safetensors.torch import save_file

        metadata = {"lora_adapter_metadata": json.dumps({"r": self.config.rank,
                                                         "lora_alpha": self.config.alpha or self.config.rank})}
        tmp = path.with_suffix(".tmp")
        save_file(self.adapter_tensors(), str(tmp), metadata=metadata)
        tmp.replace(path)
