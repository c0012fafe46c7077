"""Running on many ranks: the process environment, DeepSpeed, matrix ownership, the gradient exchange, the step."""
