"""Benchmark clients (`distrt bench ...`)."""
