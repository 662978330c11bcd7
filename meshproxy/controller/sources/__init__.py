"""Where cluster state comes from: the Kubernetes API, or a directory of manifests."""
