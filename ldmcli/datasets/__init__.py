"""Small datasets the package can write to disk for training and checks (see :mod:`ldmcli.datasets.digits`)."""
