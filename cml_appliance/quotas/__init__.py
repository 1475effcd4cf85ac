"""Quotas: CPU, memory and GPUs an account may hold at once, checked at every start."""
