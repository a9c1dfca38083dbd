"""The package list, which pyproject.toml cannot compute: fmlab's packages under src/, and conf/ (at the repository's
top level) shipped as the package `fmlab.conf` with each config group as a namespace package of YAML files, listed
so that setuptools builds them without a warning per group."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    package_dir={"": "src", "fmlab.conf": "conf"},
    packages=[
        *find_packages("src"),
        "fmlab.conf",
        *(f"fmlab.conf.{name}" for name in find_namespace_packages("conf")),
    ],
    package_data={"fmlab": ["metrics/weights/*.pt"], "fmlab.conf": ["*.yaml", "**/*.yaml"]},
)
