"""Session editors (JupyterLab): each session's own server on a Unix socket, served to its owner
on an origin of its own (the editors' listener)."""
