# conf/ ships inside the fmlab wheel as the package resource `fmlab.conf` (Hydra: pkg://fmlab.conf).
