"""The mesh controller: cluster state (Kubernetes API or manifest files) -> topology -> the
dynamic configuration every proxy polls, as Traefik Mesh's controller does."""
