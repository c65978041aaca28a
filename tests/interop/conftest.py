"""Interop tests of adapt against HF PEFT, run by the ``interop`` nox session (``pytest -m interop``)."""
