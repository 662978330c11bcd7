"""TCP routing and relaying."""
