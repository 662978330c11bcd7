# One image for both roles: `meshproxy proxy ...` (DaemonSet) and `meshproxy controller ...`.
FROM python:3.11-slim AS build
# A C compiler for mypyc, which compiles the per-request modules (setup.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY meshproxy ./meshproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 999 --no-create-home meshproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 999
EXPOSE 1081 1082 8080 9000
ENTRYPOINT ["meshproxy"]
CMD ["proxy"]
