"""Training's torch side: the steppable LoRA trainer, its maths, the adapter on the pipeline, kohya export."""
