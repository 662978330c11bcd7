"""meshproxy: a per-node service-mesh data plane speaking Traefik's dynamic configuration."""

__version__ = "0.1.0"
