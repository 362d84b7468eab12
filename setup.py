"""The compiled fast paths of the repo parse, store and event check (migration_assets/atproto/_fastrepo.c).
They are optional: where they cannot be built (no C compiler, C library or OpenSSL headers, no Python
headers), the install goes on and the Python references run; tests/repos/test_fast_parse.py fails when
the module is missing, so CI always runs it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "migration_assets.atproto._fastrepo",
            ["migration_assets/atproto/_fastrepo.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
