"""Thin HTTP routes: parse, call :mod:`serving.ranking` / the store / the ingestor, shape the response."""
