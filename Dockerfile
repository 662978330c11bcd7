# One image for both roles: `meshproxy proxy ...` (DaemonSet) and `meshproxy controller ...`.
FROM python:3.11-slim AS build
# A C compiler for mypyc, which compiles the per-request modules (setup.py), and for Cython,
# which compiles the HTTP/2 libraries (meshproxy/http2/cython_build.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY meshproxy ./meshproxy
# One virtualenv: the package and its dependencies, then h2, hpack and hyperframe compiled in
# place (their own sources), then Cython removed. Copied whole into the runtime image, whose
# Python is at the same path.
RUN python -m venv /opt/meshproxy \
    && /opt/meshproxy/bin/pip install --no-cache-dir '.[accel]' \
    && /opt/meshproxy/bin/python -m meshproxy.http2.cython_build \
    && /opt/meshproxy/bin/pip uninstall -y cython \
    && /opt/meshproxy/bin/meshproxy version | grep -q "hot path: compiled, h2: compiled"
# (the last line fails the build rather than ship an image that silently fell back to Python)

FROM python:3.11-slim
RUN useradd --system --uid 999 --no-create-home meshproxy
COPY --from=build /opt/meshproxy /opt/meshproxy
ENV PATH=/opt/meshproxy/bin:$PATH
USER 999
EXPOSE 1081 1082 8080 9000
ENTRYPOINT ["meshproxy"]
CMD ["proxy"]
