"""What the tests share: tiny models, float64 references of the equations, the tiny LLaMA stack."""
