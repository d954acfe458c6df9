"""Deterministic demo corpora (kws, langid, instrument, pool) built from Debian packages; see __main__."""
