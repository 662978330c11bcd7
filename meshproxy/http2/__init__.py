"""HTTP/2 (h2c) on both sides of the proxy: the server connection clients speak to
(`meshproxy.http2.server`) and the upstream pool for `h2c` servers (`meshproxy.http2.upstream`).
Both are built on the `h2` library (sans-IO)."""
