"""The one part of the build pyproject.toml cannot say: the tracer's optional
C extension (tracewire/_speedups.c).  ``optional=True``: without a C
compiler or Python's headers the install goes on and the tracer runs in
pure Python (docs/design.md, "The tracer's C path")."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tracewire._speedups", ["tracewire/_speedups.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
