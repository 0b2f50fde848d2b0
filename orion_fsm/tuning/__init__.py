"""Fine-tuning an agent on feedback: LoRA on CPU from the agent's GGUF, merged back into a GGUF
the runtime loads, registered as a variant agent (`orion-fsm models tune`).

Needs the `tune` extra (transformers, peft); imported only when a tune runs.
"""
