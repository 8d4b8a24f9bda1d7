"""The train stage: Ray Train workers fine-tune the student with DeepSpeed ZeRO, LoRA (PEFT) or full."""
