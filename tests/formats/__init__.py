"""Tests of lowbit.formats (a package so the test modules can share the float64 references in `_reference`)."""
