"""Tests of training.cli."""
