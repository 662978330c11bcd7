"""`meshproxy local`: the proxy and demo backends on loopback, from an embedded config."""

from __future__ import annotations

import logging
from importlib import resources

from meshproxy.config.static import build_static
from meshproxy.daemon import ProxyDaemon
from meshproxy.demo.backend import serve_whoami

log = logging.getLogger("meshproxy.local")

WEB_PORT = 8000
ADMIN_PORT = 8080


def dynamic_config_path() -> str:
    return str(resources.files("meshproxy.local").joinpath("dynamic.yaml"))


async def run_local(web_port: int = WEB_PORT, admin_port: int = ADMIN_PORT) -> None:
    backends = [
        await serve_whoami("127.0.0.1", 19001, "whoami-1"),
        await serve_whoami("127.0.0.1", 19002, "whoami-2"),
    ]
    static, _ = build_static(
        None,
        [
            f"--entryPoints.web.address=127.0.0.1:{web_port}",
            f"--entryPoints.traefik.address=127.0.0.1:{admin_port}",
            f"--providers.file.filename={dynamic_config_path()}",
            "--api.insecure",
            "--ping",
            "--metrics.prometheus=true",
        ],
    )
    daemon = ProxyDaemon(static)
    print(
        f"""meshproxy local mesh is up (Ctrl-C to stop)
  demo backends : whoami-1 on 127.0.0.1:19001, whoami-2 on 127.0.0.1:19002
  proxy         : entrypoint web on 127.0.0.1:{web_port}, admin on 127.0.0.1:{admin_port}
  config        : {dynamic_config_path()}

Try:
  curl -H 'Host: whoami.demo.traefik.mesh' http://127.0.0.1:{web_port}/        # round robin
  curl -H 'Host: whoami.demo.traefik.mesh' http://127.0.0.1:{web_port}/v2/     # PathPrefix
  curl -H 'Host: split.demo.traefik.mesh' http://127.0.0.1:{web_port}/         # 3:1 split
  curl http://127.0.0.1:{admin_port}/api/rawdata
  curl http://127.0.0.1:{admin_port}/metrics
""",
        flush=True,
    )
    try:
        await daemon.run_forever()
    finally:
        for backend in backends:
            backend.close()
