"""l4 package."""
