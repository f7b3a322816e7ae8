"""Tests of engine.scaleout."""
