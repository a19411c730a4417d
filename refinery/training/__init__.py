"""Fine-tune and evaluate the student: arms, prompts, LoRA, answer metrics."""
