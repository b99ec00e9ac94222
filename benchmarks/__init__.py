"""Speed, memory and learning-quality benchmarks of peft_mma against PEFT's own methods (see README.md here)."""
