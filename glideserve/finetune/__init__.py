"""Fine-tuning LoRA adapters on served models (the ``finetune`` extra: peft): datasets, the trainer, and the
service that co-schedules training micro-steps with inference."""
