"""Glue for training stacks that build the optimizer themselves (HF transformers ``Trainer``)."""
