"""Images: the backing OCI registry, the proxy in front of it, and its tokens."""
