"""zaya's test suite. A package, so that helpers import as ``tests.tiny_model`` and friends."""
