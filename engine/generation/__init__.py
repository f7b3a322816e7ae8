"""The generation library (torch side): model loading, prompts, samplers, adapters, the Generator."""
