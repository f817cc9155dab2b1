"""lora_tutorial: the tested code behind the LoRA tutorial book."""

__version__ = "0.1.0"
