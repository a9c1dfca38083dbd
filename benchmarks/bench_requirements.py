"""Print the `bench` extra's requirements, one per line, from fmlab's installed metadata: what `make bench` installs
with `pip install --no-deps -r` (pyproject.toml says why)."""

from importlib.metadata import requires

for requirement in requires("fmlab") or []:
    name, _, marker = requirement.partition(";")
    if marker.replace("'", '"').strip() == 'extra == "bench"':
        print(name.strip())
