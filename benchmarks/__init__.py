"""Benchmarks: one command per question, each prints a table and writes JSON under benchmarks/results/."""
