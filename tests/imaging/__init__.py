"""Tests of openmedgemma.imaging."""
