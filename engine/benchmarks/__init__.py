"""Benchmarks (python -m engine bench) and the stand-ins they run on: tiny LoRAs, the Discord double."""
