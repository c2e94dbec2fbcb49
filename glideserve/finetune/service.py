"""Fine-tuning jobs co-scheduled with inference: the engine loop asks for one training micro-step at a time.

The service owns the jobs (their records, events and checkpoints under ``work_dir``) and at most one
trainer. The engine loop (``AsyncEngine``) calls ``run_micro_step`` on its compute thread only when no
request could miss its deadline by it (see ``TrainingGate``); the HTTP routes create, list and cancel
jobs from the event loop, so the shared state is behind one lock. A finished job's adapter is written
to the model's LoRA folder and is servable at once; a server restarted on the same folders resumes its
unfinished jobs from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glideserve.errors import GlideServeError, InvalidRequestError, ModelLoadError
from glideserve.finetune.dataset import DatasetLimits, read_pairs, resolve_folder, unpack_zip
from glideserve.finetune.trainer import FineTuneConfig

log = logging.getLogger(__name__)
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_EVENTS = 1000
SAFETY = 2.0  # a micro-step runs only where twice its measured time fits in every request's slack


class NotFoundJobError(GlideServeError):
    http_status = 404
    code = "job_not_found"


@dataclass
class FineTuneJob:
    """One job's public state (OpenAI's ``fine_tuning.job`` shape plus progress) and its event log."""

    id: str
    config: FineTuneConfig
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"  # queued, running, paused (inference needs the time), then a terminal status
    step: int = 0
    loss: float | None = None
    finished_at: int | None = None
    error: str | None = None
    steps_per_min: float | None = None
    events: deque = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    seq: int = 0

    def event(self, message: str, **data) -> None:
        self.seq += 1
        self.events.append({"object": "fine_tuning.job.event", "id": f"{self.id}-{self.seq}", "seq": self.seq,
                            "created_at": int(time.time()), "level": "info", "message": message, "data": data})

    def as_dict(self) -> dict:
        c = self.config
        remaining = c.steps - self.step
        eta = None if not self.steps_per_min or self.status in TERMINAL else int(remaining / self.steps_per_min * 60)
        return {"object": "fine_tuning.job", "id": self.id, "model": c.model, "training_file": c.dataset,
                "status": self.status, "created_at": self.created_at, "finished_at": self.finished_at,
                "fine_tuned_model": c.adapter_name if self.status == "succeeded" else None,
                "suffix": c.adapter_name, "seed": c.seed, "trained_steps": self.step, "loss": self.loss,
                "steps_per_minute": self.steps_per_min, "estimated_seconds_left": eta,
                "error": None if self.error is None else {"message": self.error},
                "hyperparameters": {"n_steps": c.steps, "batch_size": c.batch_size, "learning_rate": c.learning_rate,
                                    "lora_rank": c.rank, "lora_alpha": c.alpha or c.rank,
                                    "target_modules": list(c.target_modules)}}

    def record(self) -> dict:
        return {"id": self.id, "config": self.config.as_dict(), "created_at": self.created_at, "status": self.status,
                "step": self.step, "error": self.error, "finished_at": self.finished_at}


class FineTuningService:
    """See the module docstring. ``models`` maps a served model's name to a callable that returns
    ``(family, lora_store, ledger)`` once it is loaded (None while it is not)."""

    def __init__(self, data_dir: Path, models: dict[str, Callable[[], tuple | None]],
                 limits: DatasetLimits = DatasetLimits(), clock: Callable[[], float] = time.monotonic):
        self.data_dir = Path(data_dir)
        self.work_dir = self.data_dir / ".jobs"  # dataset names cannot start with '.': no clash
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.models = models
        self.limits = limits
        self.clock = clock
        self.jobs: dict[str, FineTuneJob] = {}
        self._lock = threading.Lock()
        self._trainer = None
        self._trainer_job: str | None = None
        self._ledger = None
        self._store = None
        self._step_s: float | None = None  # EWMA of a micro-step's wall time
        self._resume()

    # -- the API side ------------------------------------------------------------------
    def create(self, config: FineTuneConfig) -> FineTuneJob:
        if config.model not in self.models:
            raise ModelLoadError(f"model {config.model!r} is not served here; fine-tune one of "
                                 f"{', '.join(self.models)}", "model")
        read_pairs(resolve_folder(self.data_dir, config.dataset), self.limits)  # validated before it is queued
        resources = self.models[config.model]()
        if resources is not None and resources[1] is None:
            raise InvalidRequestError("this server keeps no LoRA folder for the adapter; start it with --lora-dir",
                                      "model")
        if resources is not None and config.adapter_name in resources[1].available():
            raise InvalidRequestError(f"an adapter named {config.adapter_name!r} exists already; choose another "
                                      "suffix", "suffix")
        with self._lock:
            if any(j.config.adapter_name == config.adapter_name and j.status not in ("failed", "cancelled")
                   for j in self.jobs.values()):
                raise InvalidRequestError(f"a job already produces the adapter {config.adapter_name!r}; choose "
                                          "another suffix", "suffix")
            job = FineTuneJob("ftjob-" + secrets.token_hex(8), config)
            job.event("job created", dataset=config.dataset)
            self.jobs[job.id] = job
            self._save(job)
        return job

    def add_dataset(self, data: bytes) -> dict:
        """Unpack an uploaded zip as a new dataset; validated whole, or removed again."""
        name = "upload-" + secrets.token_hex(8)
        folder = self.data_dir / name
        try:
            unpack_zip(data, folder, self.limits)
            pairs = read_pairs(folder, self.limits)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"object": "file", "id": name, "purpose": "fine-tune", "bytes": len(data),
                "created_at": int(time.time()), "pairs": len(pairs)}

    def get(self, job_id: str) -> FineTuneJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundJobError(f"no fine-tuning job {job_id!r}; list them with GET /v1/fine_tuning/jobs",
                                   "fine_tuning_job_id")
        return job

    def cancel(self, job_id: str) -> FineTuneJob:
        job = self.get(job_id)
        with self._lock:
            if job.status not in TERMINAL:
                job.status, job.finished_at = "cancelled", int(time.time())
                job.event("job cancelled")
                self._save(job)
        return job

    # -- the engine side (compute thread) ----------------------------------------------
    @classmethod
    def for_models(cls, data_dir: str | Path, models) -> "FineTuningService":
        """A service over an engine's ``ModelSet``: a model's trainer resources exist while it is loaded."""
        def resources(slot):
            core = slot.core
            return None if core is None else (core.runner.family, core.runner.loras, core.scheduler.memory)

        return cls(Path(data_dir), {s.name: (lambda s=s: resources(s)) for s in models.slots})

    def between_steps(self, models, lock, idle: bool) -> bool:
        """The engine loop's call between two inference steps (or when ``idle``): one micro-step if a job
        waits and twice its measured time fits in the least slack of every model's requests. Never raises."""
        if not self.wants_step():
            return False
        with lock:
            budget = math.inf if idle else models.least_slack_s(time.monotonic())
        if not self.may_run(budget):
            self.note_paused()
            return False
        try:
            return self.run_micro_step()
        except Exception:  # training must never stop the loop that serves requests
            log.exception("fine-tuning micro-step failed")
            return False

    def wants_step(self) -> bool:
        with self._lock:
            return any(j.status not in TERMINAL for j in self.jobs.values()) or self._trainer is not None

    def estimate_s(self) -> float:
        return self._step_s if self._step_s is not None else 0.1

    def may_run(self, budget_s: float) -> bool:
        """Whether a micro-step fits in ``budget_s`` seconds of the requests' least slack."""
        return budget_s >= SAFETY * self.estimate_s()

    def note_paused(self) -> None:
        with self._lock:
            job = self.jobs.get(self._trainer_job or "")
            if job is not None and job.status == "running":
                job.status = "paused"
                job.event("paused: inference needs the time")

    def run_micro_step(self) -> bool:
        """One training micro-step of the current job (building its trainer first); False if none could run."""
        self._drop_cancelled()
        job = self._current()
        if job is None:
            return False
        try:
            return self._micro_step(job)
        except Exception as exc:  # a failed job must not stop the engine loop
            log.exception("fine-tuning job %s failed", job.id)
            self._end(job, "failed", f"{type(exc).__name__}: {exc}")
            return True

    def _micro_step(self, job: FineTuneJob) -> bool:
        start = self.clock()
        if self._trainer is None and not self._start(job):
            return False
        loss = self._trainer.step()
        elapsed = self.clock() - start
        self._step_s = elapsed if self._step_s is None else 0.8 * self._step_s + 0.2 * elapsed
        trainer = self._trainer
        with self._lock:
            if job.status in TERMINAL:  # cancelled while this step ran: freed at the next call
                return True
            if job.status == "paused":
                job.event("resumed")
            job.status, job.step, job.loss = "running", trainer.state.step, round(loss, 6)
            job.steps_per_min = round(60.0 / self._step_s, 1)
            if job.step % 10 == 0 or trainer.done:
                job.event(f"step {job.step}/{job.config.steps}: loss {loss:.4f}", step=job.step, loss=loss)
        if trainer.state.step % job.config.checkpoint_every == 0 and not trainer.done:
            trainer.save_checkpoint(self._checkpoint(job))
        if trainer.done:
            self._finish(job)
        return True

    def checkpoint_now(self) -> None:
        """Save the running job and free its trainer (at shutdown: a restarted server resumes from here;
        called between micro-steps, the next one rebuilds the trainer from this checkpoint)."""
        job = self.jobs.get(self._trainer_job or "")
        if self._trainer is not None and job is not None and job.status not in TERMINAL:
            self._trainer.save_checkpoint(self._checkpoint(job))
            log.info("fine-tuning job %s checkpointed at step %d", job.id, job.step)
        with self._lock:
            self._release()

    # -- internals -----------------------------------------------------------------------
    def _current(self) -> FineTuneJob | None:
        with self._lock:
            if self._trainer_job is not None:
                return self.jobs[self._trainer_job]
            waiting = [j for j in self.jobs.values() if j.status not in TERMINAL]
            return min(waiting, key=lambda j: j.created_at) if waiting else None

    def _start(self, job: FineTuneJob) -> bool:
        from glideserve.finetune.trainer import LoRATrainer

        resources = self.models[job.config.model]()
        if resources is None:
            return False  # the model is not loaded now: wait
        family, store, ledger = resources
        trainer = LoRATrainer(family, job.config, read_pairs(resolve_folder(self.data_dir, job.config.dataset),
                                                             self.limits))
        if ledger is not None and not ledger.claim(f"finetune:{job.id}", trainer.memory_bytes):
            with self._lock:
                if not job.events or "waiting for memory" not in job.events[-1]["message"]:
                    job.event(f"waiting for memory: {trainer.memory_bytes} bytes of adapter and optimizer state")
            return False
        checkpoint = self._checkpoint(job)
        if checkpoint.is_file():
            trainer.load_checkpoint(checkpoint)
            job.event(f"resumed from the checkpoint at step {trainer.state.step}")
        with self._lock:
            self._trainer, self._trainer_job, self._ledger, self._store = trainer, job.id, ledger, store
            if job.status in TERMINAL:  # cancelled while the trainer was built
                self._release()
                return False
            job.status = "running"
            job.event("training started", memory_bytes=trainer.memory_bytes)
        return True

    def _finish(self, job: FineTuneJob) -> None:
        store = self._store
        if store is None:
            self._end(job, "failed", "the model serves no LoRA folder (start the server with --lora-dir)")
            return
        self._trainer.export(store.directory / f"{job.config.adapter_name}.safetensors")
        store.forget(job.config.adapter_name)  # read afresh on first use
        self._end(job, "succeeded", None)
        log.info("fine-tuning job %s done: adapter %s", job.id, job.config.adapter_name)

    def _end(self, job: FineTuneJob, status: str, error: str | None) -> None:
        with self._lock:
            job.status, job.error, job.finished_at = status, error, int(time.time())
            job.event(f"job {status}" + (f": {error}" if error else ""))
            self._save(job)
            self._release()

    def _drop_cancelled(self) -> None:
        with self._lock:
            job = self.jobs.get(self._trainer_job or "")
            if job is not None and job.status == "cancelled":
                self._release()
                self._checkpoint(job).unlink(missing_ok=True)

    def _release(self) -> None:
        """Free the trainer's memory and its ledger claim (lock held)."""
        if self._ledger is not None and self._trainer_job is not None:
            self._ledger.release(f"finetune:{self._trainer_job}")
        self._trainer, self._trainer_job, self._ledger, self._store = None, None, None, None

    def _checkpoint(self, job: FineTuneJob) -> Path:
        return self.work_dir / f"{job.id}.checkpoint.safetensors"

    def _save(self, job: FineTuneJob) -> None:
        path = self.work_dir / f"{job.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.record()), encoding="utf-8")
        tmp.replace(path)

    def _resume(self) -> None:
        for path in sorted(self.work_dir.glob("ftjob-*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                config = FineTuneConfig(**{**record["config"], "target_modules": tuple(record["config"]
                                                                                        ["target_modules"])})
            except (OSError, ValueError, KeyError, TypeError, GlideServeError) as exc:
                log.warning("skipping the unreadable job record %s: %s", path, exc)
                continue
            job = FineTuneJob(record["id"], config, created_at=record["created_at"], status=record["status"],
                              step=record.get("step", 0), error=record.get("error"),
                              finished_at=record.get("finished_at"))
            if job.status not in TERMINAL:
                job.status = "queued"
                job.event("queued again after a restart")
            self.jobs[job.id] = job
