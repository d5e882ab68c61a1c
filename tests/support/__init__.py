"""What the tests share: models and data, float64 reference recomputations, recorders, and the multi-process
worker scripts (run as ``python tests/support/NAME_worker.py``). Imported as ``support`` (tests/conftest.py puts
tests/ on the path); nothing here is collected as a test.
"""
