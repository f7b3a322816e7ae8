"""Tests of engine.generation."""
