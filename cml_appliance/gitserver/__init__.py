"""The git server: every project is a repository, served over smart HTTP."""
