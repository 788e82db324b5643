"""Transformer pruning: attention blocks, head and FFN-neuron plans, token pruning."""
