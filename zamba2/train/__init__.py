"""Training: data loaders, the trainer (pretraining, annealing), FSDP2, LoRA, SFT, DPO, finetune."""
