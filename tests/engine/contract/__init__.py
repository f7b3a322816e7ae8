"""Tests of engine.contract."""
