"""The compiled fast paths of the repo parse, store and event check (atproto/_fastrepo.c, which setup.py
builds with gcc and OpenSSL's headers), or None where the install could not build them: every caller
then takes its Python path, the reference, which is slower but reads and refuses the same bytes alike.
tests/repos/test_fast_parse.py fails when it is missing, so CI always runs it."""

try:
    from migration_assets.atproto import _fastrepo as fastrepo
except ImportError:  # pragma: no cover
    fastrepo = None
