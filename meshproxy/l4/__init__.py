"""Layer-4 plumbing shared by every protocol: the byte pipe (`pipe.py`) that TCP routes use
and that upgraded HTTP connections (WebSocket, CONNECT) and TLS passthrough are meant to use."""
