"""Parameter-efficient fine-tuning: LoRA adapters (lora.py), saved alone
(storage.py), their parameter fraction (fraction.py), and the source's two-stage
fine-tuning with a per-epoch staircase learning rate (stages.py)."""
