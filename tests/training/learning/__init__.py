"""Tests of training.learning."""
