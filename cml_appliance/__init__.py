"""cml-appliance: a self-hosted machine-learning workbench speaking CML's API v2."""

__version__ = "0.1.0"
