"""The ``persona`` command line: the one package above ``streaming`` and ``serving``.

It composes the model (``recsys``), the shared core (``persona``: settings, events, store, ingestion) and the two
services (``streaming``, ``serving``) into commands, the demo and its reports; nothing below imports it
(tests/test_layers.py checks the rule).
"""
