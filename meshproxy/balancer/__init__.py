"""balancer package."""
